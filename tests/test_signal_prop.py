"""Signal propagation records against direct computations, and what they show at init."""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import method_cfg
from msr_train import compare
from msr_train.methods import build_method
from msr_train.models import build_model
from msr_train.models.resnet import ResidualBlock
from msr_train.signal_prop import (STATS, conv_mean_shift, gaussian_batch, record_signal_prop,
                                   signal_propagation)

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("signal_prop_init", ROOT / "scripts" / "signal_prop_init.py")
signal_prop_init = importlib.util.module_from_spec(spec)
spec.loader.exec_module(signal_prop_init)


def stats(x):
    """Per-channel mean and variance by flattening each channel: independent of channel_stats."""
    per_channel = x.transpose(0, 1).reshape(x.shape[1], -1).double()
    means = per_channel.mean(1)
    variances = ((per_channel - means[:, None]) ** 2).mean(1)
    return float((means ** 2).mean()), float(variances.mean())


def model(method, name="resnet8", size=16, **overrides):
    torch.manual_seed(0)
    return build_model(name, build_method(method_cfg(method, **overrides)), in_channels=3, num_classes=10,
                       image_size=size)


def test_records_equal_the_statistics_of_the_activations_computed_by_hand():
    net = model("msr")
    x = gaussian_batch((3, 16, 16), 8)
    records = signal_propagation(net, x)

    net.eval()  # MSR noise is off in eval mode, as in the measurement
    with torch.no_grad():
        h = net.stem(x)
        expected = [(*stats(h), None)]
        for block in net.stages.modules():
            if isinstance(block, ResidualBlock):
                branch_var = stats(block.branch(h))[1]
                h = block(h)
                expected.append((*stats(h), branch_var))
    assert [r["block"] for r in records] == list(range(len(expected))) == list(range(4))
    assert [r["name"] for r in records] == ["stem", "stages.0.0", "stages.1.0", "stages.2.0"]
    assert [r["depth"] for r in records] == [1, 3, 5, 7]
    for r, (sq_mean, var, branch_var) in zip(records, expected):
        assert r["avg_sq_mean"] == pytest.approx(sq_mean, rel=1e-5)
        assert r["avg_var"] == pytest.approx(var, rel=1e-5)
        assert r["branch_var"] == (None if branch_var is None else pytest.approx(branch_var, rel=1e-5))


def test_vgg_is_measured_after_every_conv_unit():
    net = model("none", "vgg11")
    x = gaussian_batch((3, 16, 16), 4)
    records = signal_propagation(net, x)
    expected, h = [], x
    with torch.no_grad():
        for i, layer in enumerate(net.features):
            h = layer(h)
            if isinstance(layer, nn.ReLU):  # none: conv, identity norm, ReLU
                expected.append((f"features.{i}", *stats(h)))
    assert len(records) == 8 == sum(isinstance(m, nn.Conv2d) for m in net.modules())
    assert [r["depth"] for r in records] == list(range(1, 9))
    for r, (name, sq_mean, var) in zip(records, expected):
        assert r["name"] == name and r["branch_var"] is None
        assert r["avg_sq_mean"] == pytest.approx(sq_mean, rel=1e-5)
        assert r["avg_var"] == pytest.approx(var, rel=1e-5)


def test_batchnorm_uses_batch_statistics_and_nothing_changes():
    net = model("bn")
    net.stem.train()
    net.stages.eval()  # mixed modes must come back as they were
    modes = {name: m.training for name, m in net.named_modules()}
    buffers = {k: v.clone() for k, v in net.state_dict().items()}
    rng = torch.get_rng_state()

    records = signal_propagation(net, gaussian_batch((3, 16, 16), 32))
    # The stem is conv -> BN -> ReLU: with batch statistics each channel is relu(z), z ~ N(0, 1),
    # of mean 1/sqrt(2 pi) and variance 1/2 - 1/(2 pi). (Running statistics at init would leave
    # the conv's scale in place.)
    assert records[0]["avg_sq_mean"] == pytest.approx(1 / (2 * math.pi), rel=0.05)
    assert records[0]["avg_var"] == pytest.approx(0.5 - 1 / (2 * math.pi), rel=0.05)
    # Every branch ends in a BN of unit gain.
    assert all(r["branch_var"] == pytest.approx(1, rel=1e-3) for r in records[1:])

    assert {name: m.training for name, m in net.named_modules()} == modes
    assert all(torch.equal(v, buffers[k]) for k, v in net.state_dict().items())
    assert all(m.track_running_stats for m in net.modules() if isinstance(m, nn.BatchNorm2d))
    assert torch.equal(torch.get_rng_state(), rng)


@pytest.fixture(scope="module")
def at_init():
    """ResNet-20 at init (16 px inputs: quick), records by variant label of the init script."""
    x = gaussian_batch((3, 16, 16), 16)
    return {label: signal_propagation(signal_prop_init.build(method, overrides, he_init, "resnet20", 0), x)
            for label, (method, overrides, he_init) in signal_prop_init.VARIANTS.items()
            if label in ("none, He init", "msr", "nf, SkipInit off")}


def test_mean_shift_grows_with_depth_without_normalisation_and_not_with_msr_or_nf(at_init):
    he = at_init["none, He init"]
    assert he[-1]["avg_sq_mean"] > 100 * he[0]["avg_sq_mean"]
    # The channel means take over the signal: mean^2 / var goes from about 0.5 to about 2.
    assert he[-1]["avg_sq_mean"] / he[-1]["avg_var"] > 2 * he[0]["avg_sq_mean"] / he[0]["avg_var"]
    msr = at_init["msr"]
    assert max(r["avg_sq_mean"] for r in msr) < 3 * msr[0]["avg_sq_mean"] < 1
    nf = at_init["nf, SkipInit off"]
    assert max(r["avg_sq_mean"] for r in nf) < 0.05
    assert all(0.5 < r["avg_var"] < 2 for r in nf)


def test_conv_mean_shift_covers_every_conv():
    net = model("none")
    x = gaussian_batch((3, 16, 16), 8)
    shifts = conv_mean_shift(net, x)
    assert list(shifts) == [name for name, m in net.named_modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        assert shifts["stem.0"] == pytest.approx(stats(net.stem[0](x))[0], rel=1e-5)
        h = net.stem(x)
        assert shifts["stages.0.0.branch.0"] == pytest.approx(stats(net.stages[0][0].branch[0](h))[0], rel=1e-5)


class FakeWriter:
    def __init__(self):
        self.scalars = []

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def flush(self):
        pass


def test_record_signal_prop_appends_documented_records(tmp_path):
    net = model("nf", skipinit=False)
    writer = FakeWriter()
    first = record_signal_prop(net, tmp_path, 0, writer, (3, 16, 16), "cpu", batch_size=8)
    record_signal_prop(net, tmp_path / "signal_prop.jsonl", 1, None, (3, 16, 16), "cpu", batch_size=8)
    lines = [json.loads(line) for line in (tmp_path / "signal_prop.jsonl").read_text().splitlines()]
    assert len(lines) == 8 and [r["epoch"] for r in lines] == [0] * 4 + [1] * 4
    assert set(lines[0]) == {"epoch", "block", "name", "depth", "avg_sq_mean", "avg_var", "branch_var"}
    assert lines[:4] == first
    # Same model, same fixed input: the same numbers.
    assert [r["avg_var"] for r in lines[4:]] == [r["avg_var"] for r in lines[:4]]
    assert first[1]["avg_var"] == pytest.approx(
        signal_propagation(net, gaussian_batch((3, 16, 16), 8))[1]["avg_var"])
    # Every statistic to TensorBoard at step = epoch; the stem has no branch.
    assert len(writer.scalars) == 4 * len(STATS) - 1
    assert ("signal_prop/avg_sq_mean/block_003", first[3]["avg_sq_mean"], 0) in writer.scalars

    # The file plots through msr-compare.
    (tmp_path / "summary.json").write_text(json.dumps({"status": "completed", "method": "nf"}))
    compare.main(["--signal-prop", str(tmp_path), "--epoch", "1", "--out", str(tmp_path / "out")])
    assert (tmp_path / "out" / "signal_prop_epoch1.png").exists()
