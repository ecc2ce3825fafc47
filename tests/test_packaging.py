"""A plain (non-editable) install must ship the Hydra configs inside the package, and
Hydra must find every config group in it; the README's setup is what CI runs, and it puts
the tools on the PATH."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # real runs, processes or sweeps: deselect with -m 'not slow'

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


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


def readme_block(heading: str) -> list[str]:
    """The lines of the first bash block under the README's ``## heading``."""
    text = README.read_text().split(f"\n## {heading}\n", 1)[1]
    return text.split("```bash\n", 1)[1].split("```", 1)[0].splitlines()


def test_the_readme_setup_is_what_ci_runs_and_puts_the_tools_on_path():
    setup = readme_block("Install and run")
    assert setup[:2] == ["python3 -m venv .venv && .venv/bin/pip install -e .", "source .venv/bin/activate"]
    assert setup[-1] == "msr-train"
    # CI pastes the README's test command, which makes the venv the setup's first line makes.
    test_command = readme_block("Test")
    assert len(test_command) == 1 and test_command[0] in (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_command[0].startswith(setup[0].split(" && ")[0] + " && .venv/bin/pip install -q -e ")
    # In this venv (the one the README's lines make), `source .venv/bin/activate` puts the
    # three tools on the PATH of a new bash, as the commands msr-train prints expect.
    activate = Path(sys.prefix) / "bin" / "activate"
    res = subprocess.run(["bash", "-c", f"source {activate} && command -v msr-train msr-compare msr-eval && "
                          "msr-train --help"], capture_output=True, text=True, timeout=120, env={"PATH": "/usr/bin:/bin"})
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[:3] == [str(Path(sys.prefix) / "bin" / tool)
                                           for tool in ("msr-train", "msr-compare", "msr-eval")]
    assert "msr-train: train ResNet and VGG image classifiers" in res.stdout
