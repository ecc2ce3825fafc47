"""Mean Shift Rejection: each invariant of docs/methods.md ("msr"), checked directly."""

import math

import pytest
import torch
from torch import nn

from conftest import method_cfg, train_steps
from msr_train.methods import build_method
from msr_train.methods.msr import MSRConv2d, noise_factors
from msr_train.models import build_model
from msr_train.models.resnet import Bottleneck, ResNet
from msr_train.optim import build_optimizer


def build(model="resnet8", size=16, channels=3, **cfg):
    """MSR as the paper defines it (zero-mean stem, noise at every conv) unless ``cfg``
    says otherwise: the invariants below are the paper's; the defaults (plain stem, no
    noise, chosen on validation) are tested by name."""
    cfg = {"stem": "msr", "noise_at": "conv", **cfg}
    method = build_method(method_cfg("msr", **cfg))
    net = build_model(model, method, in_channels=channels, num_classes=5, image_size=size)
    return net, method


def slice_stats(weight):
    """(|mean|, norm) of every zero-mean slice: (kh, kw) slices, or rows over `in` for 1x1."""
    if weight.dim() == 4 and weight.shape[-1] * weight.shape[-2] > 1:
        s = weight.detach().flatten(2)
    else:
        s = weight.detach().flatten(1)[:, None, :] if weight.dim() == 4 else weight.detach()[:, None, :]
    return s.mean(-1).abs(), s.norm(dim=-1)


def batches(n, batch=8, size=16, channels=3, classes=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, channels, size, size, generator=g), torch.randint(classes, (batch,), generator=g))
            for _ in range(n)]


def test_zero_mean_init_slices_and_magnitude():
    net, _ = build("resnet50", size=16, init_magnitude=0.7)
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            mean, norm = slice_stats(m.weight)
            assert (mean <= 1e-6 * norm.clamp_min(1e-3)).all(), m
            assert torch.allclose(m.weight.flatten(1).norm(dim=1), torch.tensor(0.7), atol=1e-5)
            assert m.bias is None or getattr(m, "role") == "stem"


def test_filter_scale_starts_at_0_8():
    net, _ = build()
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert all(isinstance(m, MSRConv2d) for m in convs)
    assert all(torch.allclose(m.log_scale.exp(), torch.tensor(0.8)) for m in convs)


def test_variance_preserving_scale_keeps_a_plain_stacks_signal_where_0_8_loses_it():
    """scale_init=preserve_variance is 1 / sqrt(Var ReLU(z)) for z ~ N(0, 1) (the variance by
    numerical integration, not the formula the code uses); at init a VGG-16 keeps its
    activation variance through its 13 conv units with it and loses nearly all with 0.8."""
    from scipy import integrate, stats
    from msr_train.methods.msr import VARIANCE_PRESERVING_SCALE
    mean = integrate.quad(lambda z: z * stats.norm.pdf(z), 0, math.inf)[0]
    second = integrate.quad(lambda z: z * z * stats.norm.pdf(z), 0, math.inf)[0]
    assert VARIANCE_PRESERVING_SCALE == pytest.approx((second - mean ** 2) ** -0.5, rel=1e-9)

    def conv_output_variances(scale_init):
        torch.manual_seed(0)
        net, _ = build("vgg16", size=32, channels=1, scale_init=scale_init, noise_at="off")
        variances = []
        hooks = [m.register_forward_hook(lambda m, i, o: variances.append(float(o.var(dim=(0, 2, 3)).mean())))
                 for m in net.modules() if isinstance(m, MSRConv2d)]
        with torch.no_grad():
            net.eval()(torch.randn(64, 1, 32, 32))
        for h in hooks:
            h.remove()
        return variances
    kept, lost = conv_output_variances("preserve_variance"), conv_output_variances(0.8)
    assert len(kept) == 13 and all(0.3 < v / kept[0] < 3 for v in kept), kept
    assert lost[-1] < 1e-6 * lost[0], lost


def test_zmg_is_the_exact_projection_and_alpha_is_partial():
    for alpha in (1.0, 0.9):
        net, method = build(zmg_alpha=alpha)
        x, y = batches(1)[0]
        nn.functional.cross_entropy(net(x), y).backward()
        conv = net.stages[0][0].branch[0]
        before = conv.weight.grad.clone()
        method.before_step(net, None)
        expected = before - alpha * before.mean((2, 3), keepdim=True)  # independent formula
        assert torch.allclose(conv.weight.grad, expected, atol=1e-7)
        assert torch.allclose(conv.weight.grad.mean((2, 3)), (1 - alpha) * before.mean((2, 3)), atol=1e-7)


@pytest.mark.parametrize("optimizer", [
    ["optimizer=sgd", "optimizer.momentum=0.9", "optimizer.weight_decay=5e-4", "optimizer.lr=0.02"],
    ["optimizer=adamw", "optimizer.weight_decay=0.05", "optimizer.lr=1e-3"],
])
@pytest.mark.parametrize("model,cross", [("resnet8", False), ("bottleneck", True)])
def test_zero_mean_invariant_holds_after_200_steps(optimizer, model, cross):
    from conftest import make_cfg
    if model == "bottleneck":  # a narrow ResNet-50-style net: 1x1 convs and projection shortcuts
        method = build_method(method_cfg("msr", zmg_cross_channel=True, stem="msr", noise_at="conv"))
        net = ResNet(method, Bottleneck, [1, 1, 1, 1], [8, 8, 16, 16], stem="small", in_channels=3,
                     num_classes=5, zero_pad_shortcuts=False)
        method.finalize(net)
    else:
        net, method = build(model, size=8)
    opt = build_optimizer(make_cfg(*optimizer).optimizer, method.param_groups(net), 4)
    initial = [w.detach().clone() for w in method._projected]
    losses = train_steps(net, method, opt, batches(200, batch=4, size=8))
    assert all(math.isfinite(v) for v in losses)
    projected = list(method._projected)
    assert len(projected) == sum(1 for m in net.modules() if isinstance(m, nn.Conv2d)
                                 and (cross or m.kernel_size != (1, 1)))
    for w, w0 in zip(projected, initial):
        assert not torch.equal(w, w0)  # it trained
        mean, norm = slice_stats(w)
        assert (mean < 1e-5 * norm).all(), (w.shape, float((mean / norm).max()))


def noisy_conv(delta=0.1, shift=0.1, bias=True):
    torch.manual_seed(0)
    conv = MSRConv2d(3, 4, 3, padding=1, bias=bias, role="stem", scale_init=0.8,
                     noise_delta=delta, noise_shift=shift)
    with torch.no_grad():
        conv.log_scale.copy_(torch.randn(4))
    return conv


def test_noise_is_per_sample_and_channel_and_train_only():
    n, s = noise_factors(512, 4, 0.1, 0.1)
    assert n.shape == s.shape == (512, 4, 1, 1)
    assert n.min() >= 0.9 and n.max() <= 1.1 and s.min() >= -0.1 and s.max() <= 0.1
    assert n.std() > 0.01 and s.std() > 0.01  # it does vary across samples and channels
    assert abs(float(n.mean()) - 1.0) < 0.01 and abs(float(s.mean())) < 0.01
    conv = noisy_conv()
    x = torch.randn(512, 3, 5, 5)
    conv.eval()
    clean = conv(x)
    conv.train()
    ratio = (conv(x) / clean).flatten(2)
    spread = ratio.std(-1) / ratio.mean(-1).abs()
    # A multiplier alone would make the ratio constant over H x W; the shift makes it vary.
    assert spread.max() > 1e-3 and not torch.equal(conv(x), conv(x))


# 6 x 7 x 7 output pixels per channel against 27 weights: the scale is folded into the
# weight; 1 x 2 x 2 against 27: it multiplies the output.
@pytest.mark.parametrize("shape,on_output", [((6, 3, 7, 7), False), ((1, 3, 2, 2), True)])
def test_msr_conv_is_scale_times_noised_raw_conv_output(shape, on_output):
    """Applying exp(theta) to the weight or to the output must give exactly g * (conv(x) -
    s) * n, with the same gradients for the weight, the bias and theta as the unfused
    formula (in float64, where the orders of the products agree to rounding)."""
    x = torch.randn(*shape, dtype=torch.float64)
    for delta, shift in ((0.1, 0.1), (0.3, 0.0)):
        conv = noisy_conv(delta, shift).double()
        assert conv.scales_output(x) == on_output
        torch.manual_seed(1)
        y = conv(x)
        torch.manual_seed(1)
        n, s = noise_factors(shape[0], 4, delta, shift, dtype=torch.float64)
        g = conv.log_scale.exp().view(1, -1, 1, 1)
        ref = g * (nn.functional.conv2d(x, conv.weight, conv.bias, padding=1) - s) * n
        torch.testing.assert_close(y, ref)
        up = torch.randn_like(y)
        grads = torch.autograd.grad((y * up).sum(), [conv.weight, conv.bias, conv.log_scale])
        ref_grads = torch.autograd.grad((ref * up).sum(), [conv.weight, conv.bias, conv.log_scale])
        for a, b in zip(grads, ref_grads):
            torch.testing.assert_close(a, b)
    conv.eval()
    torch.testing.assert_close(conv(x), conv.log_scale.exp().view(1, -1, 1, 1)
                               * nn.functional.conv2d(x, conv.weight, conv.bias, padding=1))


def test_multiplier_is_clamped_to_0_2():
    torch.manual_seed(0)
    n, _ = noise_factors(4096, 1, 3.0, 0.0)
    assert n.min() >= 0 and n.max() <= 2 and (n == 0).any() and (n == 2).any()


def test_eval_is_deterministic_and_noise_free_training_graph_is_the_test_graph():
    net, _ = build()
    x = torch.randn(4, 3, 16, 16)
    net.train()
    assert not torch.equal(net(x), net(x))  # noise is on in training
    net.eval()
    with torch.no_grad():
        assert torch.equal(net(x), net(x))
    quiet, _ = build(noise_delta=0, noise_shift=0)
    quiet.train()
    train_out = quiet(x)
    quiet.eval()
    assert torch.equal(train_out, quiet(x))  # no batch statistics anywhere


def test_soft_anchors_gradient_matches_autograd_of_the_penalty():
    """before_step adds d/dW of 0.01 * sum over filters of non-stem convs and classifier
    rows of (||w|| - 1)^2, computed here by autograd, one row at a time."""
    net, method = build(anchor_weight=0.01, zmg_alpha=0.0)  # alpha 0: no projection
    params = [m.weight for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        for w in params:
            w.mul_(1.5)
    penalty = sum(0.01 * (row.norm() - 1) ** 2
                  for m in net.modules() if isinstance(m, nn.Conv2d) and m.role != "stem"
                  for row in m.weight)
    penalty = penalty + sum(0.01 * (row.norm() - 1) ** 2 for row in net.head.weight)
    expected = torch.autograd.grad(penalty, params, allow_unused=True)
    for w in params:
        w.grad = torch.ones_like(w)  # stands for the data gradient
    method.before_step(net, None)
    for w, e in zip(params, expected):
        torch.testing.assert_close(w.grad, 1 + (torch.zeros_like(w) if e is None else e))
    assert any(e is not None and e.abs().max() > 1e-3 for e in expected)
    quiet_net, quiet = build(anchor_weight=0, zmg_alpha=0.0)
    for w in quiet_net.parameters():
        w.grad = torch.ones_like(w)
    quiet.before_step(quiet_net, None)
    assert all(torch.equal(w.grad, torch.ones_like(w)) for w in quiet_net.parameters())


def test_learning_rate_groups():
    from conftest import make_cfg
    net, method = build()
    opt = build_optimizer(make_cfg("optimizer.lr=0.1").optimizer, method.param_groups(net), 128)
    conv_group, other_group = opt.param_groups
    assert conv_group["lr"] == pytest.approx(0.4) and other_group["lr"] == pytest.approx(0.1)
    conv_ids = {id(p) for p in conv_group["params"]}
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            assert id(m.weight) in conv_ids and (m.bias is None or id(m.bias) not in conv_ids)
        if isinstance(m, MSRConv2d):
            assert id(m.log_scale) in conv_ids
    assert id(net.head.weight) not in conv_ids
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == sum(p.numel() for p in net.parameters())


def test_vgg_gets_no_conv_bias_but_the_stem():
    net, _ = build("vgg11", size=16)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert convs[0].bias is not None and all(c.bias is None for c in convs[1:])


# ---------------------------------------------------------------- the authors' options

def test_authors_operator_amplifies_the_zero_mean_part_and_keeps_the_mean():
    net, method = build(zmg_operator="authors", zmg_m=0.9)
    x, y = batches(1)[0]
    nn.functional.cross_entropy(net(x), y).backward()
    conv = net.stages[0][0].branch[0]
    g = conv.weight.grad.clone()
    method.before_step(net, None)
    mean = g.mean((2, 3), keepdim=True)
    torch.testing.assert_close(conv.weight.grad, mean + 1.9 * (g - mean))  # trainer.py's formula, rewritten
    torch.testing.assert_close(conv.weight.grad.mean((2, 3)), g.mean((2, 3)))  # not a projection


def test_plain_stem_is_the_authors_unprojected_unscaled_noiseless_conv():
    net, method = build(stem="plain", anchor_weight=0.0)
    stem = net.stem[0]
    assert type(stem) is nn.Conv2d and stem.bias is not None
    mean, norm = slice_stats(stem.weight)
    assert (mean <= 1e-6 * norm).all()  # zero-mean initialised, like every conv (InitUtil.py)
    for p in net.parameters():
        p.grad = torch.ones_like(p)
    method.before_step(net, None)
    assert torch.equal(stem.weight.grad, torch.ones_like(stem.weight))  # never projected
    assert not torch.equal(net.stages[0][0].branch[0].weight.grad, torch.ones(16, 16, 3, 3))
    x = torch.randn(4, 3, 16, 16)
    net.train()
    torch.testing.assert_close(stem(x), nn.functional.conv2d(x, stem.weight, stem.bias, padding=1))


@pytest.mark.parametrize("noise_at", ["block_input", "off"])
def test_noise_placement(noise_at):
    from msr_train.methods.msr import NoisyInputJoin
    net, _ = build(noise_at=noise_at)
    convs = [m for m in net.modules() if isinstance(m, MSRConv2d)]
    assert all(m.noise_delta == 0 and m.noise_shift == 0 for m in convs)
    joins = [m for m in net.modules() if isinstance(m, NoisyInputJoin)]
    assert len(joins) == (3 if noise_at == "block_input" else 0)  # ResNet-8: one block per stage
    x = torch.randn(4, 3, 16, 16)
    net.train()
    assert torch.equal(net(x), net(x)) == (noise_at == "off")
    net.eval()
    with torch.no_grad():
        assert torch.equal(net(x), net(x))


def test_block_input_noise_feeds_branch_and_shortcut_the_same_noisy_input():
    from msr_train.methods.msr import NoisyInputJoin
    join = NoisyInputJoin(nn.Identity(), 0.1, 0.1)
    x = torch.randn(8, 4, 5, 5).relu()  # a block input: a ReLU output
    seen = []
    torch.manual_seed(3)
    out = join(x, lambda h: seen.append(h) or h, lambda h: seen.append(h) or 2 * h)
    torch.manual_seed(3)
    n, s = noise_factors(8, 4, 0.1, 0.1)
    # The authors' ReLU after the shift (ResnetBiasScaling.py): zeros stay zero, not -s * n.
    torch.testing.assert_close(seen[0], ((x - s) * n).relu())
    assert seen[0] is seen[1] and (seen[0] >= 0).all() and ((x - s) * n < 0).any()
    torch.testing.assert_close(out, 3 * ((x - s) * n).relu())


def test_method_weight_decay_overrides_the_optimizers():
    from conftest import make_cfg
    net, method = build(weight_decay=0.0)
    opt = build_optimizer(make_cfg("optimizer.weight_decay=5e-4").optimizer, method.param_groups(net), 128)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0, 0.0]
    net, method = build()
    opt = build_optimizer(make_cfg("optimizer.weight_decay=5e-4").optimizer, method.param_groups(net), 128)
    assert [g["weight_decay"] for g in opt.param_groups] == [5e-4, 5e-4]


def test_defaults_are_the_papers_settings_those_of_msr_paper():
    """conf/method/msr.yaml's decision: method=msr is the paper's MSR, a zero-mean noised
    stem and noise at every conv (the converged protocol's test was inconclusive)."""
    assert method_cfg("msr") == method_cfg("msr_paper")
    method = build_method(method_cfg("msr"))
    net = build_model("resnet8", method, in_channels=1, num_classes=5, image_size=16)
    assert type(net.stem[0]) is not nn.Conv2d  # the stem is an MSR conv
    net.train()
    x = torch.randn(4, 1, 16, 16)
    assert not torch.equal(net(x), net(x))  # noise drawn in training
    net.eval()
    assert torch.equal(net(x), net(x))


@pytest.mark.parametrize("operator", ["project", "authors"])
def test_hooks_leave_weights_without_gradients_alone(operator):
    """A weight that got no gradient (frozen, unused) gets the anchors' gradient only, the
    others the usual ZMG; with no gradient at all the hooks still run."""
    net, method = build(zmg_operator=operator)
    method.before_step(net, None)  # no gradients anywhere
    stem, conv = net.stem[0], net.stages[0][0].branch[0]
    x, y = batches(1)[0]
    nn.functional.cross_entropy(net(x), y).backward()
    stem.weight.grad = None
    method.before_step(net, None)
    assert stem.weight.grad is None  # the zero-mean stem is projected, not anchored
    if operator == "project":
        assert conv.weight.grad.mean((2, 3)).abs().max() < 1e-6
