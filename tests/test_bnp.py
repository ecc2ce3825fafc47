"""BN Preconditioning: one preconditioned step equals one gradient step on the
BN-reparametrised parameters, computed here independently with autograd; the running
statistics estimate the input distribution at any batch size; it trains at batch 1."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import make_cfg
from msr_train.errors import ConfigError
from msr_train.methods import build_method
from msr_train.methods.bnp import BNPConv2d, BNPLinear
from msr_train.models import build_model
from msr_train.train import train

LR = 0.3


def bnp_method(*overrides):
    """bnp's preconditioner alone (its default clipping off) unless overridden."""
    return build_method(make_cfg("method=bnp", "method.grad_clip_norm=null", *overrides).method)


def skewed_input(shape, feature_dim, generator):
    """Features with means in [-2, 2] and standard deviations in [0.2, 3]: the uneven,
    off-centre inputs that preconditioning is for. Returns the sampler and (mean, std)."""
    n = shape[feature_dim]
    view = [1] * len(shape)
    view[feature_dim] = n
    mean = torch.empty(n, dtype=torch.float64).uniform_(-2, 2, generator=generator)
    std = torch.empty(n, dtype=torch.float64).uniform_(0.2, 3, generator=generator)

    def sample():
        return mean.view(view) + std.view(view) * torch.randn(shape, dtype=torch.float64, generator=generator)
    return sample, mean, std


def bnp_step(layer, h, loss_fn):
    """Our path: the layer's forward (statistics frozen), backward, the method's hook,
    then a plain SGD step on (W, b)."""
    method = bnp_method()
    method.finalize(layer)
    layer.eval()
    opt = torch.optim.SGD(layer.parameters(), lr=LR)
    loss_fn(layer(h)).backward()
    method.before_step(layer, opt)
    opt.step()
    return layer.weight.detach(), layer.bias.detach()


def test_linear_step_equals_sgd_on_the_bn_reparametrisation():
    g = torch.Generator().manual_seed(0)
    layer = BNPLinear(6, 4, momentum=0.1, eps=1e-5).double()
    sample, _, _ = skewed_input((16, 6), 1, g)
    for _ in range(30):
        layer(sample())
    h, target = sample(), torch.randn(16, 4, dtype=torch.float64, generator=g)

    def loss_fn(y):
        return ((y.tanh() - target) ** 2).mean()

    # Reference: BN on the layer's input with the frozen statistics, y = V (h - mu)/sqrt(D) + c.
    mu, d = layer.running_mean.clone(), layer.running_var + 1e-5
    w, b = layer.weight.detach().clone(), layer.bias.detach().clone()
    v = (w * d.sqrt()).requires_grad_()
    c = (b + w @ mu).requires_grad_()
    loss_fn(F.linear((h - mu) / d.sqrt(), v, c)).backward()
    with torch.no_grad():
        w_ref = (v - LR * v.grad) / d.sqrt()
        b_ref = (c - LR * c.grad) - w_ref @ mu
    # The reparametrisation is the same function: the reference is not trivially off.
    torch.testing.assert_close(F.linear(h, w, b), F.linear((h - mu) / d.sqrt(), v, c).detach())

    w_new, b_new = bnp_step(layer, h, loss_fn)
    torch.testing.assert_close(w_new, w_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b_new, b_ref, rtol=1e-5, atol=1e-5)
    assert (w_new - w).abs().max() > 1e-3  # a real step was taken


@pytest.mark.parametrize("stride", [1, 2])
def test_conv_step_equals_sgd_on_the_bn_reparametrisation(stride):
    g = torch.Generator().manual_seed(1)
    layer = BNPConv2d(3, 5, 3, stride, momentum=0.1, eps=1e-5).double()
    sample, _, _ = skewed_input((4, 3, 7, 7), 1, g)
    for _ in range(30):
        layer(sample())
    h = sample()
    target = torch.randn(layer(h).shape, dtype=torch.float64, generator=g)

    def loss_fn(y):
        return ((y.tanh() - target) ** 2).mean()

    # Reference: the BN reparametrisation in parameter space, W = V / sqrt(D) (per input
    # channel, over kh x kw) and b = c - sum_(in,kh,kw) W mu, exact with zero padding too.
    mu, d = layer.running_mean.clone().view(1, -1, 1, 1), (layer.running_var + 1e-5).view(1, -1, 1, 1)
    w, b = layer.weight.detach().clone(), layer.bias.detach().clone()
    v = (w * d.sqrt()).requires_grad_()
    c = (b + (w * mu).sum((1, 2, 3))).requires_grad_()

    def reparametrised(v, c):
        w_of_v = v / d.sqrt()
        return w_of_v, c - (w_of_v * mu).sum((1, 2, 3))

    loss_fn(F.conv2d(h, *reparametrised(v, c), stride=stride, padding=1)).backward()
    with torch.no_grad():
        w_ref, b_ref = reparametrised(v - LR * v.grad, c - LR * c.grad)
    # Without padding the parameter-space form is BN on the input, literally.
    hn = (h - mu) / d.sqrt()
    torch.testing.assert_close(F.conv2d(h, w, b, stride), F.conv2d(hn, v, c, stride).detach())

    w_new, b_new = bnp_step(layer, h, loss_fn)
    torch.testing.assert_close(w_new, w_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b_new, b_ref, rtol=1e-5, atol=1e-5)
    assert (w_new - w).abs().max() > 1e-3


@pytest.mark.parametrize("batch", [1, 32])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_running_statistics_estimate_the_input_distribution(kind, batch):
    """Also at batch 1, where a linear layer sees one value per feature per step: the
    estimate must not collapse to the within-batch variance (0)."""
    g = torch.Generator().manual_seed(2)
    if kind == "linear":
        layer = BNPLinear(512, 2, momentum=0.1, eps=1e-5).double()
        sample, mean, std = skewed_input((batch, 512), 1, g)
    else:
        layer = BNPConv2d(64, 2, 3, momentum=0.1, eps=1e-5).double()
        sample, mean, std = skewed_input((batch, 64, 6, 6), 1, g)
    for _ in range(300):
        layer(sample())
    ratio = layer.running_var / std ** 2
    assert abs(ratio.mean().item() - 1) < 0.12
    assert ((layer.running_mean - mean) / std).pow(2).mean().sqrt() < 0.4

    # Evaluation does not touch the statistics.
    before = layer.running_mean.clone(), layer.running_var.clone()
    layer.eval()
    layer(sample())
    assert torch.equal(before[0], layer.running_mean) and torch.equal(before[1], layer.running_var)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_one_statistics_update_matches_the_mixture_formula(kind):
    """mean <- (1-m) mean + m bm, var <- (1-m) var + m bv + m (1-m) (bm - mean)^2, with the
    batch moments from ``var_mean`` in float64; the input has a large mean and a small
    spread, where a naive E[h^2] - E[h]^2 in float32 would cancel."""
    torch.manual_seed(3)
    if kind == "linear":
        layer, h, dims = BNPLinear(8, 2, momentum=0.3, eps=1e-5), 5 + 0.01 * torch.randn(64, 8), (0,)
    else:
        layer, h, dims = BNPConv2d(8, 2, 3, momentum=0.3, eps=1e-5), 5 + 0.01 * torch.randn(16, 8, 5, 5), (0, 2, 3)
    for _ in range(3):  # bring the running mean near the batch's, as in training
        layer(h)
    mean, var = layer.running_mean.double(), layer.running_var.double()
    bv, bm = torch.var_mean(h.double(), dim=dims, correction=0)
    layer(h)
    m = 0.3
    torch.testing.assert_close(layer.running_mean.double(), (1 - m) * mean + m * bm)
    torch.testing.assert_close(layer.running_var.double(), (1 - m) * var + m * bv + m * (1 - m) * (bm - mean) ** 2,
                               rtol=1e-4, atol=1e-9)


def test_fresh_statistics_precondition_as_the_identity():
    layer = BNPConv2d(3, 4, 3, momentum=0.1, eps=1e-5)
    layer.weight.grad, layer.bias.grad = torch.randn_like(layer.weight), torch.randn_like(layer.bias)
    gw, gb = layer.weight.grad.clone(), layer.bias.grad.clone()
    layer.precondition_grad_()
    torch.testing.assert_close(layer.weight.grad, gw / (1 + 1e-5))
    torch.testing.assert_close(layer.bias.grad, gb)


@pytest.mark.parametrize("name,size", [("resnet20", 16), ("vgg11", 96)])
def test_every_layer_is_preconditioned_and_keeps_its_statistics(name, size):
    model = build_model(name, bnp_method(), in_channels=1, num_classes=5, image_size=size)
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert all(isinstance(m, (BNPConv2d, BNPLinear)) and m.bias is not None for m in layers)
    assert isinstance(layers[-1], BNPLinear) and layers[-1].out_features == 5  # the classifier too
    state = model.state_dict()
    for buffer in ("running_mean", "running_var"):
        assert sum(k.endswith(buffer) for k in state) == len(layers)


def test_trains_at_batch_size_one(tmp_path):
    cfg = make_cfg("debug=quick", "method=bnp", "dataset.image_size=8", "dataset.synthetic_train=64",
                   "dataset.synthetic_test=32", "batch_size=1", "epochs=1", "trainer.max_steps=20",
                   "trainer.log_every=5")
    summary = train(cfg, tmp_path)
    assert summary["status"] == "completed" and summary["step"] == 20
    assert math.isfinite(summary["final_train_loss"]) and math.isfinite(summary["final_test_acc"])
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)["model"]
    means = [v for k, v in state.items() if k.endswith("running_mean")]
    assert means and all(m.abs().sum() > 0 for m in means)  # statistics were collected and saved


def test_its_own_clipping_is_the_trainers_global_norm_clip_before_preconditioning(tmp_path):
    """At batch 8 bnp's bound, given at batch 128, is 0.05 x sqrt(128 / 8) = 0.2: the same
    run as the trainer's clipping at 0.2."""
    common = ["debug=quick", "method=bnp", "dataset.image_size=8", "dataset.synthetic_train=64", "epochs=1",
              "batch_size=8", "method.lr=0.05"]
    runs = {"own": ["method.grad_clip_norm=0.05", "method.reference_batch=128"],
            "trainer": ["method.grad_clip_norm=null", "trainer.grad_clip_norm=0.2"],
            "none": ["method.grad_clip_norm=null"]}
    weights = {}
    for name, extra in runs.items():
        train(make_cfg(*common, *extra), tmp_path / name)
        weights[name] = torch.load(tmp_path / name / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(weights["own"][k], weights["trainer"][k]) for k in weights["own"])
    assert not all(torch.equal(weights["own"][k], weights["none"][k]) for k in weights["own"])
    with pytest.raises(ConfigError, match="clip every gradient twice"):
        train(make_cfg(*common, "trainer.grad_clip_norm=1.0"), tmp_path / "both")


@pytest.mark.parametrize("batch_size,ref,clip,momentum", [(128, 128, 1.0, 0.1), (2, 128, 8.0, 1 - 0.9 ** (1 / 64)),
                                                          (1024, 128, 1.0, 0.1),
                                                          (2, None, 1.0, 0.1), (None, 128, 1.0, 0.1)])
def test_clip_and_statistics_window_follow_the_batch_size(batch_size, ref, clip, momentum):
    """grad_clip_norm and momentum hold at reference_batch and above; at batch B below it
    the bound is x sqrt(ref / B) (sampling noise) and the momentum keeps as many examples
    in its window: (1 - m_B)^(1 / B) = (1 - m)^(1 / ref). null, or an unknown batch (a model
    built outside a run), keeps both. The layers are built with that momentum."""
    cfg = make_cfg("method=bnp", "method.grad_clip_norm=1.0", "method.momentum=0.1",
                   f"method.reference_batch={'null' if ref is None else ref}")
    method = build_method(cfg.method, batch_size)
    assert method.grad_clip_norm == pytest.approx(clip, rel=1e-12)
    assert method.statistics_momentum == pytest.approx(momentum, rel=1e-12)
    assert method.conv(3, 4, 3).momentum == method.linear(3, 4).momentum == method.statistics_momentum


def test_statistics_window_counts_the_examples_of_one_forward_pass():
    """With gradient accumulation (or several processes) the statistics are updated once
    per micro-batch: the momentum follows the micro-batch, the clip the global batch."""
    cfg = make_cfg("method=bnp", "method.grad_clip_norm=1.0", "method.momentum=0.1", "method.reference_batch=128")
    method = build_method(cfg.method, 32, micro_batch=8)
    assert method.statistics_momentum == pytest.approx(1 - 0.9 ** (8 / 128), rel=1e-12)
    assert method.grad_clip_norm == pytest.approx(2.0, rel=1e-12)
