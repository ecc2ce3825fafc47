"""The EMA of the weights (trainer.ema_decay): its arithmetic against a plain loop, and
that a run evaluates, selects and tests the average while training the model unchanged."""

import json

import pytest
import torch
from torch import nn

from conftest import make_cfg
from msr_train.data import build_data
from msr_train.ema import WeightEMA
from msr_train.methods import build_method
from msr_train.models import build_model
from msr_train.train import evaluate, train


def test_the_average_follows_the_formula_and_copies_integer_buffers(one_thread):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Flatten(), nn.LazyLinear(4))
    model(torch.randn(2, 2, 5, 5))
    ema = WeightEMA(model, decay=0.8)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    for n in range(40):  # through the warmup (d < 0.8 up to n = 26) and past it
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model(torch.randn(2, 2, 5, 5))  # BN's running statistics and batch counter move
        ema.update(n)
        d = min(0.8, (1 + n) / (10 + n))
        for k, v in model.state_dict().items():
            expected[k] = d * expected[k] + (1 - d) * v if v.is_floating_point() else v.clone()
    averaged = ema.state_dict()
    for k, v in expected.items():
        torch.testing.assert_close(averaged[k], v, rtol=1e-5, atol=1e-6)
    assert averaged["1.num_batches_tracked"].item() == 41  # the lazy layer's first pass, then 40
    assert not any(p.requires_grad for p in ema.module.parameters())


def test_the_decay_warms_up_to_its_value():
    ema = WeightEMA(nn.Linear(2, 2), decay=0.999)
    assert ema.decay_at(0) == pytest.approx(0.1)
    assert ema.decay_at(90) == pytest.approx(91 / 100)
    assert ema.decay_at(10**6) == 0.999


RUN = ["debug=quick", "dataset.synthetic_train=512", "dataset.val_size=128", "trainer.eval_every=4",
       "logger=none"]


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory, one_thread):
    """The run without an average: (its summary, its folder)."""
    out = tmp_path_factory.mktemp("plain")
    return train(make_cfg(*RUN), out), out


def test_a_run_evaluates_the_average_and_trains_the_model_unchanged(tmp_path, plain_run):
    plain, plain_dir = plain_run
    averaged = train(make_cfg(*RUN, "trainer.ema_decay=0.9"), tmp_path / "ema")
    a, b = metrics(plain_dir), metrics(tmp_path / "ema")
    assert [r["train_loss"] for r in a] == [r["train_loss"] for r in b]  # the average never touches training
    assert [r["val_loss"] for r in a] != [r["val_loss"] for r in b]  # what is evaluated is the average
    assert [r["val_loss"] for r in a] == [r["val_raw_loss"] for r in b]  # beside the trained weights
    last = torch.load(tmp_path / "ema" / "checkpoints" / "last.pt", weights_only=True)
    plain_last = torch.load(plain_dir / "checkpoints" / "last.pt", weights_only=True)
    assert all(torch.equal(last["model"][k], plain_last["model"][k]) for k in last["model"])
    assert any(not torch.equal(last["ema"][k], last["model"][k]) for k in last["model"])
    assert averaged["status"] == plain["status"] == "completed"
    # Evaluated again here: the last record's val_acc is the average's, val_raw_acc the
    # model's, and best.pt holds the weights that scored best_val_acc.
    cfg = make_cfg(*RUN, "trainer.ema_decay=0.9")
    net, val = validation_of(cfg)
    record = b[-1]
    for weights, acc in ((last["ema"], record["val_acc"]), (last["model"], record["val_raw_acc"]),
                         (torch.load(tmp_path / "ema" / "checkpoints" / "best.pt", weights_only=True)["model"],
                          averaged["best_val_acc"])):
        net.load_state_dict(weights)
        assert evaluate(net, val, cfg.dataset.num_classes, split="val")["val_acc"] == acc


def validation_of(cfg):
    """A fresh model of the run's kind and the run's validation batches."""
    data = build_data(cfg.dataset, batch_size=cfg.batch_size, eval_batch_size=cfg.trainer.eval_batch_size,
                      seed=cfg.seed, device=torch.device("cpu"))
    net = build_model(cfg.model.name, build_method(cfg.method), in_channels=data.info.in_channels,
                      num_classes=data.info.num_classes, image_size=data.info.image_size)
    return net, data.val


def test_an_average_that_follows_the_weights_at_once_logs_the_plain_run(tmp_path, plain_run):
    """decay 1e-9 keeps (almost exactly) the current weights: every evaluation matches."""
    train(make_cfg(*RUN, "trainer.ema_decay=1e-9"), tmp_path / "ema")
    a, b = metrics(plain_run[1]), metrics(tmp_path / "ema")
    assert [r["val_acc"] for r in a] == [r["val_acc"] for r in b]
    assert [r["val_loss"] for r in a] == pytest.approx([r["val_loss"] for r in b], rel=1e-5)


def test_with_precise_bn_both_the_average_and_the_weights_are_evaluated_with_it(tmp_path, one_thread):
    """An average that follows the weights at once (decay 1e-9) scores what they score, so
    both were given the same recomputed statistics."""
    train(make_cfg(*RUN, "method=bn", "method.precise_bn_batches=2", "trainer.ema_decay=1e-9"), tmp_path)
    for record in metrics(tmp_path):
        assert record["val_acc"] == record["val_raw_acc"]
        assert record["val_loss"] == pytest.approx(record["val_raw_loss"], rel=1e-4)
