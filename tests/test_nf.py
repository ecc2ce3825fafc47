"""NF-ResNets: Scaled WS, the variance budget of the residual stream, AGC, stochastic depth.
Every expectation is computed here from the formulas in docs/methods.md ("nf"), not by
calling the code under test."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import make_cfg
from helpers import reference_agc
from msr_train.clipping import GradientClipping
from msr_train.methods import build_method
from msr_train.methods.nf import NFJoin, ScaledWeightStandardization, WSConv2d
from msr_train.models import build_model
from msr_train.models.resnet import ResidualBlock

RELU_GAMMA = 1.7139588594436646


def nf_method(*overrides):
    return build_method(make_cfg("method=nf", *(f"method.{o}" for o in overrides)).method)


def stem_conv(model):
    return model.stem[0] if hasattr(model, "stem") else model.features[0]


@pytest.mark.parametrize("name,size", [("resnet20", 32), ("resnet18", 224), ("vgg11", 32)])
def test_scaled_weight_standardization(name, size):
    torch.manual_seed(0)
    model = build_model(name, nf_method(), in_channels=3, num_classes=10, image_size=size)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(isinstance(c, WSConv2d) for c in convs)
    for conv in convs:
        with torch.no_grad():
            conv.gain.uniform_(0.5, 2.0)
            conv.bias.normal_()
        # input_scale: 1 / beta, moved in from the join for the convs reading act(h) / beta.
        gamma = (1.0 if conv is stem_conv(model) else RELU_GAMMA) * conv.input_scale
        n = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
        w = conv.weight.detach().double()
        gain = conv.gain.detach().double().view(-1, 1, 1, 1)
        w_hat = conv.standardized_weight().detach().double()

        filters = w_hat.flatten(1)
        assert filters.mean(1).abs().max() < 1e-6
        expected_var = (gamma * conv.gain.detach().double()) ** 2 / n
        torch.testing.assert_close(filters.var(1, unbiased=False), expected_var, rtol=1e-4, atol=0)

        # The layer's output equals a conv with the weight written out from the formula.
        sigma = w.std((1, 2, 3), unbiased=False, keepdim=True)
        ref = gain * gamma * (w - w.mean((1, 2, 3), keepdim=True)) / (sigma * math.sqrt(n))
        xin = torch.randn(1, conv.in_channels, 5, 5)
        expected = F.conv2d(xin.double(), ref, conv.bias.detach().double(), conv.stride, conv.padding)
        torch.testing.assert_close(conv(xin).detach().double(), expected, rtol=1e-4, atol=1e-5)


def test_plain_stem_is_an_ordinary_conv_that_sees_brightness():
    torch.manual_seed(0)
    plain = build_model("resnet18", nf_method("stem=plain"), in_channels=1, num_classes=10, image_size=28)
    ws = build_model("resnet18", nf_method(), in_channels=1, num_classes=10, image_size=28)
    stem = stem_conv(plain)
    assert type(stem) is nn.Conv2d and not torch.any(stem.bias)
    assert stem.weight.std().item() == pytest.approx(stem.weight[0].numel() ** -0.5, rel=0.15)
    body = [m for m in plain.modules() if isinstance(m, nn.Conv2d) and m is not stem]
    assert body and all(isinstance(c, WSConv2d) for c in body)
    # Two flat images of different brightness: away from the padding, the standardised
    # (zero-mean) stem answers both alike, the plain stem does not.
    dark, bright = torch.full((1, 1, 12, 12), -1.0), torch.full((1, 1, 12, 12), 1.0)
    with torch.no_grad():
        for conv, blind in ((stem_conv(ws), True), (stem, False)):
            same = torch.allclose(conv(dark)[..., 2:-2, 2:-2], conv(bright)[..., 2:-2, 2:-2], atol=1e-5)
            assert same == blind


@pytest.mark.parametrize("shape", [(6, 4, 3, 3), (5, 1, 3, 3), (7, 8, 1, 1)])
def test_standardization_node_equals_autograd_of_the_formula_in_float64(shape):
    """The closed-form backward against autograd through the formula, on filters that are
    ordinary, constant (clamped, centred to 0) and nearly constant (N var below eps, so
    the clamp holds the scale fixed), and against finite differences."""
    torch.manual_seed(0)
    const, eps = 1.7, 1e-4
    weight = torch.randn(shape, dtype=torch.float64)
    weight[1] = 0.3
    weight[2] = 0.3 + 1e-4 * torch.randn(shape[1:], dtype=torch.float64)
    weight.requires_grad_(True)
    gain = torch.empty(shape[0], dtype=torch.float64).uniform_(0.5, 2).requires_grad_(True)
    upstream = torch.randn(shape, dtype=torch.float64)

    var, mean = torch.var_mean(weight, dim=(1, 2, 3), correction=0, keepdim=True)
    formula = const * gain.view(-1, 1, 1, 1) * (weight - mean) / torch.clamp(var * weight[0].numel(), min=eps).sqrt()
    fused = ScaledWeightStandardization.apply(weight, gain, const, eps)
    torch.testing.assert_close(fused, formula, rtol=1e-12, atol=1e-14)
    expected = torch.autograd.grad((formula * upstream).sum(), (weight, gain))
    got = torch.autograd.grad((fused * upstream).sum(), (weight, gain))
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)
    ordinary = weight.detach()[3:].clone().requires_grad_(True), gain.detach()[3:].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda w, g: ScaledWeightStandardization.apply(w, g, const, eps), ordinary)


def test_standardization_floor_keeps_a_constant_filter_finite():
    conv = WSConv2d(4, 2, 3, gamma=RELU_GAMMA)
    with torch.no_grad():
        conv.weight.fill_(0.3)
    w_hat = conv.standardized_weight()
    assert torch.isfinite(w_hat).all() and w_hat.abs().max() == 0


def test_transitions_get_projection_shortcuts_in_cifar_resnets():
    model = build_model("resnet20", nf_method(), in_channels=3, num_classes=10, image_size=32)
    blocks = [m for m in model.modules() if isinstance(m, ResidualBlock)]
    transitions = [b for b in blocks if b.join.transition]
    assert len(transitions) == 2
    for b in transitions:
        assert isinstance(b.shortcut[0], WSConv2d) and b.shortcut[0].kernel_size == (1, 1)
        assert b.shortcut[0].gamma == RELU_GAMMA  # it reads act(h) / beta
        assert b.shortcut[0].input_scale == b.branch[0].input_scale == 1 / b.join.beta


@pytest.mark.parametrize("name,size", [("resnet20", 32), ("resnet18", 64), ("resnet50", 32)])
def test_residual_stream_variance_follows_the_expected_variance(name, size):
    """At init on a unit Gaussian batch (SkipInit off), the stream's variance after block k
    of a stage is 1 + k * alpha^2, reset to 1 + alpha^2 after each transition, and Scaled
    WS keeps the channel means near 0 (no mean shift)."""
    torch.manual_seed(0)
    alpha = 0.2
    model = build_model(name, nf_method("skipinit=false", "stochastic_depth=0", f"alpha={alpha}"),
                        in_channels=3, num_classes=10, image_size=size, small_input=True).eval()
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    blocks = [m for m in model.modules() if isinstance(m, ResidualBlock)]
    measured = []
    for b in blocks:
        b.register_forward_hook(lambda m, i, out: measured.append(
            (out.var(dim=(0, 2, 3)).mean().item(), (out.mean(dim=(0, 2, 3)) ** 2).mean().item())))
    with torch.no_grad():
        model(torch.randn(16, 3, size, size))

    expected, betas = [], []
    var = 1.0
    for b in blocks:
        betas.append(math.sqrt(var))
        transition = not isinstance(b.shortcut, nn.Identity)
        var = (1.0 if transition else var) + alpha ** 2
        expected.append(var)
    assert [b.join.beta for b in blocks] == pytest.approx(betas)
    for k, ((v, sq_mean), e) in enumerate(zip(measured, expected, strict=True)):
        assert abs(v / e - 1) < 0.25, f"block {k}: variance {v:.3f}, expected {e:.3f}"
        assert sq_mean < 0.05 * e, f"block {k}: squared channel mean {sq_mean:.4f}"


def test_agc_equals_the_formula_and_spares_the_classifier_weights():
    torch.manual_seed(0)
    clip = 0.05
    method = nf_method(f"agc_clip={clip}")
    model = build_model("resnet8", method, in_channels=3, num_classes=10, image_size=32)
    # DeepMind's scope: everything but the final classifier's weights (its bias is clipped).
    head = {id(model.head[-1].weight)}
    for p in model.parameters():
        with torch.no_grad():
            p.normal_()
        # Per unit, gradients from far below to far above the threshold; one all-zero unit.
        units = (p.shape[0],) + (1,) * (p.dim() - 1) if p.dim() > 1 else ()
        p.grad = torch.randn_like(p) * 10 ** torch.empty(units).uniform_(-4, 1)
        if p.dim() > 1:
            p.grad[0] = 0
    expected = {id(p): reference_agc(p.grad, p.detach(), clip) for p in model.parameters()}
    before = {id(p): p.grad.clone() for p in model.parameters()}

    GradientClipping(model, method.clipping())()

    clipped = kept = 0
    for p in model.parameters():
        if id(p) in head:
            assert torch.equal(p.grad, before[id(p)])
            continue
        torch.testing.assert_close(p.grad, expected[id(p)], rtol=1e-5, atol=0)
        changed = (p.grad != before[id(p)]).flatten(1).any(1) if p.dim() > 1 else (p.grad != before[id(p)]).any()
        clipped += int(changed.sum())
        kept += int((~changed).sum())
    assert clipped > 10 and kept > 10  # both branches of the formula were exercised
    # The head's gradients alone would have been clipped: sparing them is a real choice.
    weight = model.head[-1].weight
    assert not torch.equal(reference_agc(weight.grad, weight.detach(), clip), weight.grad)


@pytest.mark.parametrize("batch_size,expected", [(None, None), (1, None), (128, None), (1023, None),
                                                 (1024, 0.01), (4096, 0.01)])
def test_agc_auto_is_nfnets_lambda_at_large_batches_only(batch_size, expected):
    method = build_method(make_cfg("method=nf").method, batch_size)
    assert method.agc_clip == expected
    assert build_method(make_cfg("method=nf", "method.agc_clip=0.2").method, 1).agc_clip == 0.2


def test_agc_disabled():
    for clip in ("0", "null"):
        method = nf_method(f"agc_clip={clip}")
        model = build_model("resnet8", method, in_channels=3, num_classes=10, image_size=32)
        for p in model.parameters():
            p.grad = torch.full_like(p, 1e3)
        GradientClipping(model, method.clipping())()
        assert all((p.grad == 1e3).all() for p in model.parameters())


def test_stochastic_depth_drops_whole_branches_per_sample_in_training_only():
    torch.manual_seed(0)
    join = NFJoin(nn.ReLU(), alpha=0.5, transition=False)
    join.drop_rate = 0.25
    def branch(h):
        return torch.ones_like(h)

    x = torch.zeros(4000, 3, 2, 2)
    out = join(x, branch, nn.Identity())
    per_sample = out.flatten(1)
    assert (per_sample == per_sample[:, :1]).all()  # one decision per sample
    values = per_sample[:, 0]
    kept = values != 0
    torch.testing.assert_close(values[kept], torch.full_like(values[kept], 0.5 / 0.75))
    assert abs(kept.float().mean().item() - 0.75) < 0.03
    join.eval()
    assert (join(x, branch, nn.Identity()) == 0.5).all()


def test_stochastic_depth_rate_grows_linearly_with_block_index():
    model = build_model("resnet20", nf_method("stochastic_depth=0.3"), in_channels=3, num_classes=10, image_size=32)
    rates = [m.drop_rate for m in model.modules() if isinstance(m, NFJoin)]
    assert rates == pytest.approx([0.3 * i / 9 for i in range(9)])


def test_skipinit_and_classifier():
    model = build_model("resnet20", nf_method("dropout=0.3"), in_channels=3, num_classes=10, image_size=32)
    gains = [b.join.skip_gain for b in model.modules() if isinstance(b, ResidualBlock)]
    assert len(gains) == 9 and all(g.item() == 0 and g.requires_grad for g in gains)
    assert isinstance(model.head[0], nn.Dropout) and model.head[0].p == 0.3
    assert isinstance(model.head[1], nn.Linear)
    # SkipInit: every block is the identity at init.
    block = next(b for b in model.modules() if isinstance(b, ResidualBlock) and not b.join.transition)
    x = torch.randn(4, 16, 32, 32)
    torch.testing.assert_close(block(x), x)


def test_gains_biases_and_skipinit_scalars_get_no_weight_decay():
    method = nf_method()
    model = build_model("resnet8", method, in_channels=3, num_classes=10, image_size=32)
    decayed, free = method.param_groups(model)
    assert "weight_decay" not in decayed and free["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in free["params"]} == {n for n in names.values() if n.endswith(("gain", "bias"))}
    assert {names[id(p)] for p in decayed["params"]} == {n for n in names.values() if n.endswith("weight")}


def reference_ws_conv(conv, x):
    """Scaled WS from its formula, gamma and gain only: gain * gamma * (W - mean) /
    sqrt(max(N var, eps))."""
    w = conv.weight
    mean = w.mean(dim=(1, 2, 3), keepdim=True)
    var = ((w - mean) ** 2).mean(dim=(1, 2, 3), keepdim=True)
    w_hat = conv.gain.view(-1, 1, 1, 1) * conv.gamma * (w - mean) / torch.sqrt(torch.clamp(var * w[0].numel(), min=conv.eps))
    return F.conv2d(x, w_hat, conv.bias, conv.stride, conv.padding)


def reference_block(block, x, keep):
    """h + alpha * g * mask / keep * f(relu(h) / beta) written out, step by step (the mask
    drawn as the join draws it); the shortcut at a transition reads relu(h) / beta too."""
    join = block.join
    pre = torch.relu(x) / join.beta
    out = reference_ws_conv(block.branch[3], torch.relu(reference_ws_conv(block.branch[0], pre)))
    if join.skip_gain is not None:
        out = out * join.skip_gain
    if block.training:
        mask = x.new_empty((x.shape[0], 1, 1, 1)).bernoulli_(keep)
        out = out * mask / keep
    stream = reference_ws_conv(block.shortcut[0], pre) if join.transition else x
    return stream + join.alpha * out


@pytest.mark.parametrize("transition,skipinit,training", [(False, True, True), (True, True, True),
                                                          (False, False, True), (True, True, False)])
def test_fused_join_equals_the_formula_in_float64(transition, skipinit, training):
    """The join's fusions (alpha, SkipInit and stochastic depth in one addcmul; 1 / beta
    folded into the reading convs) change no value and no gradient."""
    torch.manual_seed(0)
    model = build_model("resnet20", nf_method("stochastic_depth=0.5", f"skipinit={skipinit}"), in_channels=3,
                        num_classes=10, image_size=32).double().train(training)
    block = next(b for b in model.modules() if isinstance(b, ResidualBlock) and b.join.transition == transition
                 and b.join.beta > 1)
    assert block.join.input_scale_folded
    block.join.drop_rate = 0.5
    with torch.no_grad():
        for p in block.parameters():
            p.add_(torch.randn_like(p) * 0.3)  # SkipInit away from 0, gains and biases away from 1 and 0
    x = torch.randn(8, block.branch[0].in_channels, 8, 8, dtype=torch.float64, requires_grad=True)
    params = [x, *block.parameters()]
    results = []
    for forward in (lambda: block(x), lambda: reference_block(block, x, 1 - block.join.drop_rate)):
        torch.manual_seed(1)
        y = forward()
        grads = torch.autograd.grad((y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum(), params)
        results.append((y, grads))
    (y, grads), (y_ref, grads_ref) = results
    if not transition and training:  # the mask drops some samples (the block is the identity there), keeps others
        assert 0 < (y_ref == x).flatten(1).all(1).sum() < x.shape[0]
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)


def test_checkpoints_with_skipinit_at_the_branch_end_still_load():
    """Before SkipInit's gain moved into the join it was the branch's last module
    (``branch.5.gain``); such a state dict loads into today's model."""
    torch.manual_seed(0)
    model = build_model("resnet8", nf_method(), in_channels=1, num_classes=10, image_size=16)
    with torch.no_grad():
        for b in model.modules():
            if isinstance(b, ResidualBlock):
                b.join.skip_gain.normal_()
    old = {k.replace("join.skip_gain", "branch.5.gain"): v.clone() for k, v in model.state_dict().items()}
    assert sum(k.endswith("branch.5.gain") for k in old) == 3
    fresh = build_model("resnet8", nf_method(), in_channels=1, num_classes=10, image_size=16)
    fresh.load_state_dict(old)
    for (k, v), w in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(v, w), k
