"""A plain (non-editable) install must ship the Hydra configs inside the package."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_ships_every_config(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(ROOT)], check=True, capture_output=True)
    wheel = next(tmp_path.glob("msr_train-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"msr_train/conf/{p.relative_to(ROOT / 'conf')}" for p in (ROOT / "conf").rglob("*.yaml")}
    assert "msr_train/conf/config.yaml" in expected
    assert expected <= names
