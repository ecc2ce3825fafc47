"""`msr-train` end to end on real Fashion-MNIST, and its errors."""

import json
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from helpers import FASHION, needs_fashion

pytestmark = pytest.mark.slow  # real runs, processes or sweeps: deselect with -m 'not slow'


def msr_train(*args, cwd):
    return subprocess.run([sys.executable, "-m", "msr_train.cli", *args, "trainer.progress_bar=false"],
                          cwd=cwd, capture_output=True, text=True, timeout=600)


@needs_fashion
def test_cli_trains_fashion_mnist_and_writes_every_record(tmp_path):
    run_dir = tmp_path / "run"
    res = msr_train("model=resnet8", "method=bn", "dataset=fashion_mnist", "dataset.train_size=1024",
                    "dataset.test_size=512", "dataset.val_size=1000", "batch_size=64", "epochs=2", "trainer.eval_every=10",
                    # the plain recipe: flips and label smoothing slow a 32-step run (0.46 test)
                    "dataset.augment=none", "trainer.label_smoothing=0",
                    f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    # The start banner and the end report say where, on what, how it went and what next.
    params = f"{json.loads((run_dir / 'summary.json').read_text())['params']:,}"
    for words in (f"msr-train: run dir {run_dir}", "  device    cpu, ",
                  # from Debian's copy, and why not from dataset.root (its default, data/, is not here)
                  f"  data      fashion_mnist from {FASHION} (dataset.root=data does not exist): 1,024 train / "
                  "1,000 validation / 512 test images",
                  f"  model     resnet8 ({params} parameters), method bn",
                  "  training  batch 64, lr 0.07071 (sgd; optimizer.lr 0.1 at batch 128, sqrt scaling), 2 epochs = 32",
                  "epoch 1/2: train loss ", "epoch 2/2: train loss ", "msr-train: completed at step 32 after ",
                  "  test acc  ", f"  results   {run_dir}/", f"tensorboard --logdir {run_dir}", f"msr-compare {run_dir}"):
        assert words in res.stderr, (words, res.stderr)

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # 16 steps per epoch: every 10 global steps plus each epoch end.
    assert [r["step"] for r in records] == [10, 16, 20, 30, 32]
    assert [r["examples_seen"] for r in records] == [640, 1024, 1280, 1920, 2048]
    for r in records:
        assert {"train_loss", "train_acc", "val_loss", "val_acc", "best_val_acc", "lr", "epoch", "img_per_s",
                "wall_time_s"} <= r.keys()
        assert 0 <= r["val_acc"] <= 1 and r["train_loss"] > 0
    # The test set is evaluated once, at the end (trainer.test_every_eval=false).
    assert ["test_acc" in r for r in records] == [False] * 4 + [True]
    assert records[-1]["test_acc"] > 0.5  # ten classes: chance is 0.1
    assert "test_top5" not in records[-1]  # only for more than 10 classes

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["final_test_acc"] == records[-1]["test_acc"]
    assert summary["best_val_acc"] == max(r["val_acc"] for r in records)
    assert not any("best_test" in key for key in summary)
    assert summary["params"] > 0 and summary["peak_memory_mb"] > 0 and summary["total_time_s"] > 0
    assert (summary["model"], summary["method"], summary["dataset"]) == ("resnet8", "bn", "fashion_mnist")

    events = EventAccumulator(str(run_dir))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/acc", "val/loss", "val/acc", "test/acc", "test/selected_acc", "lr",
            "throughput/img_per_s"} <= tags
    assert [e.step for e in events.Scalars("val/acc")] == [640, 1024, 1280, 1920, 2048]
    assert [e.value for e in events.Scalars("val/acc")] == pytest.approx([r["val_acc"] for r in records])
    assert [e.value for e in events.Scalars("test/selected_acc")] == pytest.approx([summary["selected_test_acc"]])
    assert {"_hparams_/experiment", "_hparams_/session_start_info", "_hparams_/session_end_info"} \
        <= set(events.PluginTagToContent("hparams"))
    # The hyperparameters live in the run itself: no extra sub-run folder.
    assert sorted(p.name for p in run_dir.iterdir() if p.is_dir()) == [".hydra", "checkpoints"]

    ckpt = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert {"model", "optimizer", "scheduler", "step", "epoch", "config"} <= ckpt.keys()
    assert ckpt["step"] == 32 and ckpt["config"]["model"]["name"] == "resnet8"


@pytest.mark.parametrize("override,words", [
    ("batch_size=0", ["batch_size=0", ">= 1"]),
    ("epochs=0", ["epochs=0", ">= 1"]),
    ("trainer.accumulate=3", ["not divisible", "trainer.accumulate=3"]),
    ("optimizer.lr=-1", ["optimizer.lr=-1", "must be a number in (0, 1e+06]"]),
    ("dataset.train_size=10", ["batch_size=128", "larger than the training set"]),
    ("dataset.val_size=-1", ["dataset.val_size=-1", "integer >= 0"]),
    ("dataset.val_size=0.5", ["dataset.val_size=0.5", "integer >= 0"]),
    ("dataset.val_size=abc", ["dataset.val_size='abc'", "integer >= 0"]),
    ("dataset.val_size=2000", ["dataset.val_size=2000", "leaves 48 of the 2048", "fewer than one batch"]),
])
def test_bad_values_fail_early_with_the_key_and_the_fix(tmp_path, override, words):
    res = msr_train("dataset=synthetic", override, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    for w in words:
        assert w in res.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_unknown_choice_lists_the_options(tmp_path):
    res = msr_train("model=resnet999", cwd=tmp_path)
    assert res.returncode != 0
    assert "resnet999" in res.stderr and "resnet20" in res.stderr and "vgg16" in res.stderr


def msr_train_offline(*args, cwd):
    """msr-train behind a dead proxy: every download fails at once."""
    dead = "http://127.0.0.1:9"
    env = {**os.environ, "http_proxy": dead, "https_proxy": dead, "HTTP_PROXY": dead, "HTTPS_PROXY": dead}
    return subprocess.run([sys.executable, "-m", "msr_train.cli", *args, "trainer.progress_bar=false"],
                          cwd=cwd, capture_output=True, text=True, timeout=600, env=env)


@pytest.mark.parametrize("download", ["false", "true"])
def test_missing_dataset_offline_says_how_to_get_it(tmp_path, download):
    res = msr_train_offline("dataset=mnist", f"dataset.root={tmp_path / 'data'}", f"dataset.download={download}",
                            f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert f"dataset=mnist: no data in {tmp_path / 'data'}" in res.stderr
    assert "dataset.download=true" in res.stderr and "set dataset.root to it" in res.stderr
    assert not (tmp_path / "data").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_missing_cuda_device_is_reported(tmp_path):
    res = msr_train("dataset=synthetic", "trainer.accelerator=cuda", f"hydra.run.dir={tmp_path / 'run'}",
                    cwd=tmp_path)
    assert res.returncode == 2 and "trainer.accelerator=cuda" in res.stderr


def test_bn_at_batch_one_explains_instead_of_crashing(tmp_path):
    # VGG on 16-px images ends on 1x1 maps: BN there sees one value per channel.
    res = msr_train("model=vgg11", "method=bn", "dataset=synthetic", "dataset.image_size=16",
                    "batch_size=1", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert res.returncode == 2
    assert "BatchNorm cannot train" in res.stderr and "method=msr" in res.stderr


@pytest.mark.parametrize("mode,key", [((), "hydra.run.dir"), (("-m",), "hydra.sweep.dir")])
def test_an_output_dir_that_cannot_be_created_is_a_clear_error(tmp_path, mode, key):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    res = msr_train(*mode, "debug=quick", f"{key}={blocker / 'run'}", cwd=tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert f"the output dir {blocker / 'run'} cannot be created or written to" in res.stderr and key in res.stderr


def test_an_interrupted_run_prints_the_command_that_continues_it(tmp_path):
    """With the default timestamped run dir, re-running the same command would start
    afresh: the message pins the run's own dir."""
    args = ["debug=quick", "epochs=400", "trainer.eval_every=4", "trainer.cpu_threads=1"]
    proc = subprocess.Popen([sys.executable, "-m", "msr_train.cli", *args], cwd=tmp_path, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not list(tmp_path.glob("outputs/debug/*/metrics.jsonl")) and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    command = next(line for line in err.splitlines() if line.startswith("msr-train: continue with: "))
    argv = shlex.split(command.removeprefix("msr-train: continue with: "))
    run_dir = next(tmp_path.glob("outputs/debug/*"))
    assert argv[0] == "msr-train" and argv[-1] == f"hydra.run.dir={run_dir}" and argv[1:-1] == args
    res = subprocess.run([sys.executable, "-m", "msr_train.cli", *argv[1:], "trainer.max_steps=1"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "trainer.max_steps: null -> 1" in res.stderr  # it found the run it continues


@pytest.mark.parametrize("launcher", ["basic", "joblib"])
def test_sweep_job_folders_are_named_from_what_varies(tmp_path, launcher):
    res = msr_train("-m", "debug=quick", "trainer.max_steps=1", "dataset.synthetic_test=32", "method=msr,none",
                    "seed=0,1", f"hydra/launcher={launcher}", f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in (tmp_path / "sweep").iterdir() if p.is_dir()) == [
        "method=msr,seed=0", "method=msr,seed=1", "method=none,seed=0", "method=none,seed=1"]
    # Parallel joblib jobs (n_jobs -1: one per core) split the cores; sequential jobs keep all.
    threads = {json.loads(p.read_text())["config"]["trainer"]["cpu_threads"]
               for p in (tmp_path / "sweep").glob("*/summary.json")}
    assert threads == ({1} if launcher == "joblib" else {None})


def test_a_long_sweep_folder_name_is_cut_and_stays_unique(monkeypatch):
    from msr_train.sweeps import MAX_SUBDIR, SWEEP_KEYS_ENV, sweep_subdir
    monkeypatch.setenv(SWEEP_KEYS_ENV, "dataset.root,method")
    long = [f"dataset.root=/data/{'x' * 300}{i}" for i in range(2)]
    names = [sweep_subdir([root, "method=msr", "seed=0"]) for root in long]
    assert all(len(n) == MAX_SUBDIR and "/" not in n for n in names) and names[0] != names[1]
    assert sweep_subdir(["method=msr", "seed=0"]) == "method=msr"
    monkeypatch.setenv(SWEEP_KEYS_ENV, "")  # nothing varies: every override names the folder
    assert sweep_subdir(["method=msr", "seed=0"]) == "method=msr,seed=0"
