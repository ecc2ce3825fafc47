"""Gradient clipping for every method (trainer.grad_clip_norm, trainer.agc_clip) and the
per-parameter norm logging (trainer.log_norms), against independent computations."""

import json
import math

import pytest
import torch
from torch import nn

from conftest import make_cfg, method_cfg
from msr_train.clipping import Clipping, GradientClipping
from msr_train.errors import ConfigError
from msr_train.methods import build_method
from msr_train.models import build_model
from msr_train.param_norms import ParamNormProbe
from msr_train.optim import build_optimizer
from msr_train.train import train, train_step
from helpers import reference_agc


def model_with_gradients(method="bn", seed=0):
    torch.manual_seed(seed)
    m = build_method(method_cfg(method))
    net = build_model("resnet8", m, in_channels=1, num_classes=10, image_size=16)
    x, y = torch.randn(8, 1, 16, 16), torch.randint(10, (8,))
    nn.functional.cross_entropy(net(x), y).backward()
    return net, m


def test_global_norm_clipping_equals_the_formula():
    net, _ = model_with_gradients()
    before = [p.grad.clone() for p in net.parameters()]
    total = math.sqrt(sum(float((g.double() ** 2).sum()) for g in before))
    max_norm = total / 3
    GradientClipping(net, Clipping(max_norm=max_norm))()
    for p, g in zip(net.parameters(), before):
        torch.testing.assert_close(p.grad, g * (max_norm / (total + 1e-6)))
    # Below the threshold nothing changes.
    GradientClipping(net, Clipping(max_norm=total))()
    torch.testing.assert_close(next(net.parameters()).grad, before[0] * (max_norm / (total + 1e-6)))


@pytest.mark.parametrize("method", ["bn", "msr", "none"])
def test_trainer_agc_equals_the_formula_and_spares_the_classifier_weight(method):
    net, _ = model_with_gradients(method)
    clip = 0.01
    expected = [reference_agc(p.grad, p.detach(), clip) for p in net.parameters()]
    before = [p.grad.clone() for p in net.parameters()]
    GradientClipping(net, Clipping(agc=clip))()
    changed = 0
    for (name, p), e, b in zip(net.named_parameters(), expected, before):
        if name == "head.weight":
            assert torch.equal(p.grad, b)
            assert not torch.equal(e, b)  # the formula would have clipped it
        else:
            torch.testing.assert_close(p.grad, e, rtol=1e-5, atol=0)
            changed += not torch.equal(p.grad, b)
    assert changed > 3


def test_clipping_comes_before_the_methods_hooks():
    net, method = model_with_gradients("msr")
    net.zero_grad()
    seen = []
    original = method.before_step
    method.before_step = lambda model, opt: (seen.append(math.sqrt(sum(
        float((p.grad ** 2).sum()) for p in model.parameters() if p.grad is not None))), original(model, opt))
    opt = build_optimizer(make_cfg("optimizer.lr=0.01").optimizer, method.param_groups(net), 8)
    clip = GradientClipping(net, Clipping(max_norm=1e-3))
    train_step(net, method, opt, torch.randn(8, 1, 16, 16), torch.randint(10, (8,)), on_gradients=clip)
    assert seen[0] == pytest.approx(1e-3, rel=1e-3)


def test_double_agc_is_refused(tmp_path):
    cfg = make_cfg("debug=quick", "method=nf", "batch_size=1024", "trainer.agc_clip=0.02")
    with pytest.raises(ConfigError, match="trainer.agc_clip=0.02 and method.agc_clip"):
        train(cfg, tmp_path)
    for bad in ("trainer.agc_clip=0", "trainer.grad_clip_norm=-1", "trainer.log_norms=1"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            train(make_cfg("debug=quick", bad), tmp_path)


def test_norm_probe_reports_each_parameters_gradient_and_weight_norm():
    net, _ = model_with_gradients()
    probe = ParamNormProbe(net)
    probe.record()
    values = probe.read()
    names = [n for n, _ in net.named_parameters()]
    assert len(values) == 2 * len(names) + 1
    for name, p in net.named_parameters():
        assert values[f"grad_norm/{name}"] == pytest.approx(float(p.grad.double().norm()), rel=1e-5)
        assert values[f"weight_norm/{name}"] == pytest.approx(float(p.detach().double().norm()), rel=1e-5)
    total = math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in net.parameters()))
    assert values["grad_norm/total"] == pytest.approx(total, rel=1e-5)
    assert probe.read() == {}  # read once


@pytest.mark.slow
def test_a_run_logs_norms_at_every_evaluation_and_clips(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    common = ["debug=quick", "method=msr", "trainer.max_steps=6", "trainer.eval_every=3", "logger=tensorboard"]
    train(make_cfg(*common, "trainer.log_norms=true", "trainer.grad_clip_norm=0.01"), tmp_path / "on")
    records = [json.loads(line) for line in (tmp_path / "on" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [3, 6]
    assert all(r["grad_norm/total"] > 0.01 for r in records)  # logged before clipping
    assert all(r["weight_norm/head.weight"] > 0 for r in records)
    tags = EventAccumulator(str(tmp_path / "on")).Reload().Tags()["scalars"]
    assert "grad_norm/head.weight" in tags and "weight_norm/stem.0.weight" in tags
    train(make_cfg(*common), tmp_path / "off")
    records = [json.loads(line) for line in (tmp_path / "off" / "metrics.jsonl").read_text().splitlines()]
    assert not any(k.startswith(("grad_norm/", "weight_norm/")) for r in records for k in r)
    train(make_cfg(*common, "trainer.log_norms=true"), tmp_path / "watched")

    def final(name):
        return torch.load(tmp_path / name / "checkpoints" / "last.pt", weights_only=True)["model"]["head.weight"]
    assert torch.equal(final("watched"), final("off"))  # logging norms leaves training as it was
    assert not torch.equal(final("on"), final("off"))  # clipping does not
