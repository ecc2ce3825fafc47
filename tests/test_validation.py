"""Honest evaluation: a validation split held out of the training set, selection on it,
and a test accuracy of the selected model that no test number chose."""

import json

import pytest
import torch

from conftest import make_cfg
from msr_train.data import build_data, split_indices
from msr_train.errors import ConfigError
from msr_train.methods import build_method
from msr_train.models import build_model
from msr_train.train import evaluate, train
from helpers import FASHION, needs_fashion

CPU = torch.device("cpu")


def test_split_is_stratified_disjoint_complete_and_fixed():
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate((100, 200, 300))])
    labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(5))]
    train_idx, val_idx = split_indices(labels, 60, seed=0)
    assert len(val_idx) == 60 and len(train_idx) == 540
    assert torch.equal(torch.sort(torch.cat([train_idx, val_idx])).values, torch.arange(600))
    # Each class gives its share: 10, 20 and 30 of 100, 200 and 300.
    assert torch.bincount(labels[val_idx]).tolist() == [10, 20, 30]
    again, other = split_indices(labels, 60, seed=0), split_indices(labels, 60, seed=1)
    assert torch.equal(again[1], val_idx) and not torch.equal(other[1], val_idx)


@needs_fashion
def test_fashion_mnist_split_does_not_depend_on_the_run_seed():
    cfg = make_cfg("dataset=fashion_mnist", f"dataset.root={FASHION}", "dataset.download=false").dataset
    data = {seed: build_data(cfg, batch_size=128, eval_batch_size=1000, seed=seed, device=CPU) for seed in (0, 1)}
    train_idx, val_idx = data[0].train.indices, data[0].val.indices
    assert (len(train_idx), len(val_idx), data[0].info.val_size) == (55_000, 5_000, 5_000)
    assert not set(train_idx.tolist()) & set(val_idx.tolist())
    assert torch.equal(torch.sort(torch.cat([train_idx, val_idx])).values, torch.arange(60_000))
    assert torch.equal(data[1].val.indices, val_idx) and torch.equal(data[1].train.indices, train_idx)
    assert torch.bincount(data[0].val.y).tolist() == [500] * 10  # 6,000 per class: stratified exactly


@needs_fashion
@pytest.mark.slow  # trains on Fashion-MNIST
def test_selected_test_accuracy_is_the_best_val_checkpoint_on_the_test_set(tmp_path):
    # A constant, high lr makes validation accuracy go up and down, so the best
    # evaluation is (usually) not the last: the selected model is not the final one.
    cfg = make_cfg("model=resnet8", "method=none", f"dataset.root={FASHION}", "dataset.download=false",
                   "dataset.train_size=1000", "dataset.val_size=500", "dataset.test_size=500", "batch_size=50",
                   "epochs=2", "trainer.eval_every=4", "scheduler=constant", "optimizer.lr=0.3",
                   "trainer.progress_bar=false", "trainer.cpu_threads=1")
    summary = train(cfg, tmp_path)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_acc"] for r in records]
    assert summary["best_val_step"] < summary["step"], "the run must exercise selecting an earlier checkpoint"
    assert summary["best_val_acc"] == max(val)
    assert summary["best_val_step"] == records[val.index(max(val))]["step"]  # the first best
    assert summary["final_val_acc"] == val[-1]
    best = torch.load(tmp_path / "checkpoints" / "best.pt", weights_only=True)
    assert best["step"] == summary["best_val_step"] and best["val_acc"] == summary["best_val_acc"]

    # An independent evaluation of best.pt on the test set.
    data = build_data(cfg.dataset, batch_size=50, eval_batch_size=1000, seed=0, device=CPU)
    model = build_model("resnet8", build_method(cfg.method), in_channels=1, num_classes=10, image_size=28,
                        small_input="auto")
    model.load_state_dict(best["model"])
    direct = evaluate(model, data.test, 10)
    assert summary["selected_test_acc"] == pytest.approx(direct["test_acc"], abs=1e-9)
    assert summary["selected_test_loss"] == pytest.approx(direct["test_loss"], rel=1e-5)
    assert summary["final_test_acc"] == records[-1]["test_acc"]
    # Test numbers exist for the final model only: nothing was selected on them.
    assert [r for r in records if "test_acc" in r] == records[-1:]


def test_without_validation_the_final_model_is_reported(tmp_path):
    cfg = make_cfg("debug=quick", "dataset.synthetic_train=128", "dataset.synthetic_test=64", "dataset.image_size=8",
                   "dataset.val_size=0", "epochs=1")
    summary = train(cfg, tmp_path)
    assert summary["best_val_acc"] is None and summary["selection"] == "final model (no validation split)"
    assert summary["selected_test_acc"] == summary["final_test_acc"] is not None
    assert not (tmp_path / "checkpoints" / "best.pt").exists()


def test_test_every_eval_logs_test_numbers_beside_validation(tmp_path):
    cfg = make_cfg("debug=quick", "dataset.synthetic_test=64", "dataset.image_size=8", "dataset.val_size=64",
                   "trainer.test_every_eval=true")
    train(cfg, tmp_path)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all({"val_acc", "test_acc"} <= r.keys() for r in records)


def test_the_best_model_comes_from_the_checkpoint_and_older_runs_from_their_best_files(tmp_path):
    """Each checkpoint carries its best model; restoring it makes best.pt hold it again (a
    newer best.pt, left by a kill between writing it and last.pt, is rewritten). A
    checkpoint of an older run carries none: best.pt or best_prev.pt holds it."""
    from msr_train.checkpoint import read_checkpoint_file, write_checkpoint_file
    from msr_train.train import BestModel
    net, best, carried = torch.nn.Linear(2, 2), BestModel(tmp_path / "best.pt"), {}
    for step in (10, 15):
        with torch.no_grad():
            net.weight.fill_(step)
        best.update(net, step, val_acc=step / 100)
        carried[step] = best.state_dict()
    assert read_checkpoint_file(tmp_path / "best.pt")["step"] == 15
    restored = BestModel(tmp_path / "best.pt")
    restored.restore(tmp_path, carried[10], 10, CPU)
    assert torch.equal(restored.state["weight"], torch.full((2, 2), 10.0))
    assert read_checkpoint_file(tmp_path / "best.pt")["step"] == 10
    old = tmp_path / "old"
    for name, step in (("best.pt", 15), ("best_prev.pt", 10)):
        write_checkpoint_file(old / name, carried[step])
    for step in (10, 15):
        legacy = BestModel(None)
        legacy.restore(old, None, step, CPU)
        assert torch.equal(legacy.state["weight"], torch.full((2, 2), float(step)))
    with pytest.raises(ValueError, match="step 5.* is in neither best file .best.pt holds step 15"):
        BestModel(None).restore(old, None, 5, CPU)
    nothing = BestModel(None)
    nothing.restore(tmp_path, None, None, CPU)  # no validation yet: nothing to restore
    assert nothing.state is None


def test_stop_at_val_acc_ends_the_run_at_the_first_evaluation_that_reaches_it(tmp_path):
    common = ["debug=quick", "dataset.synthetic_test=64", "dataset.image_size=8", "dataset.val_size=64",
              "method=bn", "epochs=3", "trainer.eval_every=2"]
    train(make_cfg(*common), tmp_path / "full")
    full = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    # The first evaluation (after the first) that raises the best validation accuracy.
    k = next(i for i in range(1, len(full) - 1) if full[i]["best_val_acc"] > full[i - 1]["best_val_acc"])
    target = (full[k - 1]["best_val_acc"] + full[k]["best_val_acc"]) / 2
    summary = train(make_cfg(*common, f"trainer.stop_at_val_acc={target}"), tmp_path / "target")
    assert summary["status"] == "reached_target" and summary["step"] == full[k]["step"]
    assert summary["best_val_acc"] == full[k]["best_val_acc"] and "selected_test_acc" not in summary
    again = train(make_cfg(*common, f"trainer.stop_at_val_acc={target}"), tmp_path / "target")  # resumed
    assert again["status"] == "reached_target" and again["step"] == summary["step"]
    with pytest.raises(ConfigError, match="trainer.stop_at_val_acc=0.5 needs a validation split"):
        train(make_cfg("debug=quick", "dataset.val_size=0", "trainer.stop_at_val_acc=0.5"), tmp_path / "noval")
