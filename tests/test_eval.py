"""`msr-eval` and `load_run`: a finished run's checkpoints evaluated without training."""

import json
import shutil
import subprocess
import sys

import pytest
import torch

import msr_train
from conftest import make_cfg
from msr_train import eval_cli
from msr_train.train import train

pytestmark = pytest.mark.slow  # trains small runs

RUNS = {"bn": [], "msr": [], "nf": [], "msr_ema": ["trainer.ema_decay=0.9"]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("runs")
    for name, extra in RUNS.items():
        method = name.split("_")[0]
        # 3 epochs with evaluations every 4 steps: the val-selected model is not the final one.
        cfg = make_cfg("debug=quick", f"method={method}", "dataset.val_size=64", "epochs=3", "trainer.eval_every=4",
                       "trainer.cpu_threads=1", *extra)
        train(cfg, root / name)
    return root


def eval_json(capsys, *argv):
    eval_cli.main([str(a) for a in argv])
    path = capsys.readouterr().out.strip().split("wrote ")[-1]
    return json.loads(open(path).read())


@pytest.mark.parametrize("name", list(RUNS))
def test_best_on_the_test_split_reproduces_the_selected_test_accuracy(runs, capsys, name):
    run = runs / name
    summary = json.loads((run / "summary.json").read_text())
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    result = eval_json(capsys, run)
    assert result["test_acc"] == summary["selected_test_acc"]
    assert result["test_loss"] == pytest.approx(summary["selected_test_loss"], rel=1e-6)
    assert result["step"] == summary["best_val_step"] and result["command"].startswith("msr-eval ")
    last = eval_json(capsys, run, "--checkpoint", "last")
    assert last["test_acc"] == summary["final_test_acc"] and last["step"] == summary["step"]
    val = eval_json(capsys, run, "--split", "val", "--batch-size", "7")
    assert val["val_acc"] == pytest.approx(summary["best_val_acc"])
    after = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    new = set(after) - set(before)
    assert {p.name for p in new} == {"eval_best_test.json", "eval_last_test.json", "eval_best_val.json"}
    assert all(after[p] == t for p, t in before.items())  # nothing else touched


def test_a_checkpoint_file_alone_and_load_run(runs, tmp_path, capsys):
    alone = tmp_path / "alone" / "nf_best.pt"
    alone.parent.mkdir()
    shutil.copy(runs / "nf" / "checkpoints" / "best.pt", alone)
    result = eval_json(capsys, alone)
    summary = json.loads((runs / "nf" / "summary.json").read_text())
    assert result["test_acc"] == summary["selected_test_acc"]
    assert (tmp_path / "alone" / "eval_nf_best_test.json").exists()
    model, cfg = msr_train.load_run(alone)
    assert cfg.method.name == "nf" and not model.training
    x = torch.randn(2, 3, 16, 16)
    assert model(x).shape == (2, 10)


def test_bn_with_per_example_statistics_at_test_time(runs, capsys):
    running = eval_json(capsys, runs / "bn")
    result = eval_json(capsys, runs / "bn", "method.eval_statistics=example")
    assert result["overrides"] == {"method.eval_statistics": "example"}
    assert result["test_loss"] != running["test_loss"]  # another normalisation, the same weights
    precise = eval_json(capsys, runs / "bn", "method.precise_bn_batches=3")
    assert precise["test_loss"] != running["test_loss"]
    # options may come before the overrides, as in any command line
    on_val = eval_json(capsys, runs / "bn", "--split", "val", "method.eval_statistics=example")
    assert on_val["split"] == "val" and on_val["overrides"] == {"method.eval_statistics": "example"}


def test_bad_input_is_one_line_and_exit_2(runs, tmp_path):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes((runs / "bn" / "checkpoints" / "best.pt").read_bytes()[:1000])
    cases = {(str(corrupt),): "is not a usable checkpoint",
             (str(tmp_path / "nowhere"),): "no such file or folder",
             (str(runs / "bn"), "optimizer.lr=1"): "msr-eval takes key=value for one of",
             (str(runs / "msr"), "method.eval_statistics=example"): "eval_statistics"}
    for argv, message in cases.items():
        res = subprocess.run([sys.executable, "-m", "msr_train.eval_cli", *argv], capture_output=True, text=True,
                             timeout=120)
        assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr, (argv, res.stderr)
