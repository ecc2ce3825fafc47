"""A plain (non-editable) install must ship the Hydra configs inside the package, and
Hydra must find every config group in it."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # real runs, processes or sweeps: deselect with -m 'not slow'

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_ships_every_config_and_hydra_composes_from_it(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(ROOT)], check=True, capture_output=True)
    wheel = next(tmp_path.glob("msr_train-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"msr_train/conf/{p.relative_to(ROOT / 'conf')}" for p in (ROOT / "conf").rglob("*.yaml")}
    assert "msr_train/conf/config.yaml" in expected
    assert expected <= names
    # The installed copy, not this checkout, must serve every group.
    target = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(target)
    probe = ("import msr_train, hydra\n"
             "from hydra import compose, initialize_config_module\n"
             "with initialize_config_module('msr_train.conf', version_base='1.3'):\n"
             "    c = compose('config', overrides=['method=nf', 'model=vgg11', 'dataset=cifar10',\n"
             "        'optimizer=adamw', 'scheduler=multistep', 'experiment=fashion_mnist_comparison'])\n"
             "print(msr_train.__file__, c.method.name, c.model.name, c.optimizer.name, c.epochs)\n")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(target)})
    assert out.returncode == 0, out.stderr
    path, *values = out.stdout.split()
    assert path.startswith(str(target))
    assert values == ["nf", "vgg11", "adamw", "3"]
