"""The command line's overrides checked before Hydra composes them: a
misspelled key or config choice, or an override Hydra cannot read, is one line with a
did-you-mean or the choices, exit code 2; every preset and a real sweep still pass."""

import importlib.util
import subprocess
import sys

import pytest

from msr_train.errors import ConfigError
from msr_train.overrides import check_command_line, check_sweep, config_groups, did_you_mean

MISTAKES = [
    (["methd=msr"], "there is no setting 'methd' (did you mean method?)"),
    (["batch=128"], "there is no setting 'batch' (did you mean batch_size?)"),
    (["lr=0.1"], "there is no setting 'lr' (did you mean method.lr or optimizer.lr?)"),
    (["trainer.max_step=3"], "there is no setting 'trainer.max_step' (did you mean trainer.max_steps?)"),
    (["model.depth=21"], "there is no setting 'model.depth' (did you mean model.name?)"),
    (["model=resnet7"], "there is no model 'resnet7' (did you mean resnet8"),
    (["method=foo"], "there is no method 'foo'; the choices are: bn, bnp, gn, gn_ws, mimicnorm, msr,"),
    (["optimizer=lion"], "there is no optimizer 'lion'; the choices are: adamw, sgd"),
    (["-m", "method=bn,msx"], "method=msx: there is no method 'msx' (did you mean msr?)"),
    (["logger=[tensorboard,mlfow]"], "logger=mlfow: there is no logger 'mlfow' (did you mean mlflow?)"),
    (["method=msr,"], "'method=msr,' is not an override Hydra can read: sweep values are separated by commas"),
    (["method"], "'method' is not an override Hydra can read: an override is key=value"),
    (["--method", "msr"], "--method: overrides are written key=value, without dashes, e.g. method=msr"),
    (["+method." + "k" * 300 + "=1"], "a key part of over 100 characters"),
    (["experiment=fashion_mnist_converged", "method.zmg_alph=1"], "(did you mean method.zmg_alpha?)"),
    (["method.name=bn"], "method.name=bn: method.name names the chosen config; choose another with method=bn"),
]


@pytest.mark.parametrize("argv,message", MISTAKES, ids=[m[0][-1][:30] for m in MISTAKES])
def test_a_mistaken_override_names_itself_and_the_fix(argv, message):
    with pytest.raises(ConfigError) as e:
        check_command_line(argv)
    assert message in str(e.value)


@pytest.mark.parametrize("argv", [
    [], ["method=msr", "batch_size=8", "optimizer.lr=0.1", "seed=0"],
    ["-m", "method=bn,msr", "batch_size=1,8", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"],
    ["logger=[tensorboard,mlflow]", "logger.mlflow.tracking_uri=sqlite:///x.db"], ["+method.extra=1", "~trainer.ema_decay"],
    ["experiment=fashion_mnist_converged", "method=gn", "method.groups=8"], ["--cfg", "job", "seed=range(3)"],
    ["debug=quick", "hparams_search=lr_optuna", "hydra.sweeper.n_trials=2"],
])
def test_overrides_that_hydra_composes_pass(argv):
    check_command_line(argv)


def test_every_option_of_every_group_passes():
    groups = config_groups()
    assert {"model", "method", "dataset", "optimizer", "logger", "experiment"} <= groups.keys()
    for group, options in groups.items():
        for option in options:
            check_command_line([f"{group}={option}"])


def test_suggestions_are_the_close_ones_only():
    assert did_you_mean("xyz", ["method", "seed"]) == ""
    assert did_you_mean("lr", ["optimizer.lr", "method.lr", "seed"]) == " (did you mean optimizer.lr or method.lr?)"
    assert did_you_mean("max_step", ["max_steps", "mean_shift"]) == " (did you mean max_steps?)"  # not the far one


def test_the_cli_exits_2_with_the_message_and_no_traceback(tmp_path):
    res = subprocess.run([sys.executable, "-m", "msr_train.cli", "methd=msr", f"hydra.run.dir={tmp_path / 'run'}"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.startswith("msr-train: error: methd=msr: there is no setting 'methd' (did you mean method?)")
    assert not (tmp_path / "run").exists()  # refused before Hydra made the run dir


@pytest.mark.parametrize("argv", [["-m", "hydra/launcher=joblib", "seed=0,1"], ["-m", "hparams_search=lr_optuna"],
                                  ["-m", "hydra/launcher=submitit_slurm", "seed=0,1"]])
def test_a_launcher_or_sweeper_that_is_not_installed_names_the_extra(argv, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("hydra_plugins.") else find_spec(name, *a))
    with pytest.raises(ConfigError, match=r'needs a Hydra plugin that is not installed .*pip install -e "\.\[launchers\]"'):
        check_command_line(argv)


def test_every_job_of_a_sweep_is_checked_before_the_first_trains():
    with pytest.raises(ConfigError) as e:
        check_sweep(["-m", "debug=quick", "optimizer.lr=0.1,-1", "method=bn,msr", "trainer.accumulate=1,2,3"])
    lines = str(e.value).splitlines()
    # lr -1 in all 6 of its jobs, accumulate 3 (not dividing batch 32) in the 2 others
    assert lines[0] == "8 of the sweep's 12 jobs would be refused, so none was started:"
    assert any(line.startswith("  optimizer.lr=-1 method=bn trainer.accumulate=1: optimizer.lr=-1 must be a number in")
               for line in lines)
    assert any(line.startswith("  optimizer.lr=0.1 method=msr trainer.accumulate=3: batch_size=32 is not divisible")
               for line in lines)
    check_sweep(["-m", "debug=quick", "optimizer.lr=0.1,0.2"])  # every job fine
    check_sweep(["debug=quick", "optimizer.lr=-1"])  # not a sweep: the run itself checks it


@pytest.mark.slow  # a CLI process
def test_a_sweep_with_a_bad_job_starts_none(tmp_path):
    res = subprocess.run([sys.executable, "-m", "msr_train.cli", "-m", "debug=quick", "optimizer.lr=0.1,-1",
                          f"hydra.sweep.dir={tmp_path / 'sweep'}"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "Traceback" not in res.stderr and "1 of the sweep's 2 jobs" in res.stderr
    assert not (tmp_path / "sweep").exists()  # the good job did not train first


def test_help_says_what_the_tool_does_and_lists_the_groups():
    res = subprocess.run([sys.executable, "-m", "msr_train.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.startswith("msr-train: train ResNet and VGG image classifiers")
    assert "\nmethod: bn, bnp, gn, gn_ws, mimicnorm, msr, msr_authors, msr_paper, msr_vp, nf, none\n" in res.stdout
    assert "The README (Install and run" in res.stdout and "powered by Hydra" not in res.stdout
