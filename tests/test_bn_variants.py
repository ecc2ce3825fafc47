"""BatchNorm's remedies (method=bn): ghost BN, precise BN, momentum and eps, each against
an independent computation."""

import math

import pytest
import torch
from torch import nn

from conftest import make_cfg, method_cfg, train_steps
from msr_train.checks import check_batchnorm_trainable
from msr_train.distributed import Context, spawn
from msr_train.errors import ConfigError
from msr_train.methods import build_method
from msr_train.methods.bn import GhostBatchNorm2d, recompute_bn_statistics_
from msr_train.models import build_model
from msr_train.optim import build_optimizer
from msr_train.train import evaluate, train
pytestmark = pytest.mark.usefixtures("one_thread")


def bn_pair(channels=3, momentum=0.1, eps=1e-5):
    """A ghost BN layer and a plain one with the same (random) affine parameters, float64."""
    torch.manual_seed(0)
    ghost = GhostBatchNorm2d(channels, 4, momentum=momentum, eps=eps).double()
    plain = nn.BatchNorm2d(channels, momentum=momentum, eps=eps).double()
    with torch.no_grad():
        for layer in (ghost, plain):
            layer.weight.copy_(torch.linspace(0.5, 2.0, channels))
            layer.bias.copy_(torch.linspace(-1.0, 1.0, channels))
    return ghost, plain


def test_ghost_bn_equals_bn_applied_to_each_virtual_batch_in_turn():
    ghost, plain = bn_pair(momentum=0.3)
    x = (torch.randn(12, 3, 5, 5, dtype=torch.float64) * 3 + 1).requires_grad_()
    out = ghost(x)
    expected = torch.cat([plain(chunk) for chunk in x.split(4)])
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(ghost.running_mean, plain.running_mean)
    torch.testing.assert_close(ghost.running_var, plain.running_var)
    assert int(ghost.num_batches_tracked) == int(plain.num_batches_tracked) == 3
    grad = torch.randn_like(out)
    (g_ghost,) = torch.autograd.grad(out, x, grad)
    (g_plain,) = torch.autograd.grad(expected, x, grad)
    torch.testing.assert_close(g_ghost, g_plain)
    ghost.eval(), plain.eval()
    torch.testing.assert_close(ghost(x), plain(x))  # evaluation: the running statistics


def test_momentum_and_eps_reach_every_layer():
    method = build_method(method_cfg("bn", momentum=0.05, eps=1e-3))
    net = build_model("resnet8", method, in_channels=1, num_classes=10, image_size=16)
    layers = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert layers and all(m.momentum == 0.05 and m.eps == 1e-3 for m in layers)
    assert not any(isinstance(m, GhostBatchNorm2d) for m in layers)  # off by default
    ghosts = build_model("resnet8", build_method(method_cfg("bn", ghost_batch_size=4)), in_channels=1,
                         num_classes=10, image_size=16)
    assert all(isinstance(m, GhostBatchNorm2d) and m.ghost_size == 4
               for m in ghosts.modules() if isinstance(m, nn.BatchNorm2d))


@pytest.mark.parametrize("overrides,key", [
    (["batch_size=12", "method.ghost_batch_size=8"], "method.ghost_batch_size=8"),
    (["batch_size=16", "trainer.accumulate=4", "method.ghost_batch_size=8"], "method.ghost_batch_size=8"),
    (["method.ghost_batch_size=4", "method.sync_bn=true"], "method.ghost_batch_size"),
    (["method.momentum=0"], "method.momentum"),
    (["method.precise_bn_batches=-1"], "method.precise_bn_batches"),
])
def test_bad_bn_settings_are_refused_before_training(tmp_path, overrides, key):
    cfg = make_cfg("debug=quick", "method=bn", *overrides)
    with pytest.raises(ConfigError) as e:
        train(cfg, tmp_path)
    assert key in str(e.value)
    assert not (tmp_path / "metrics.jsonl").exists()


def test_ghost_batch_of_one_on_one_by_one_maps_is_refused(tmp_path):
    cfg = make_cfg("debug=quick", "method=bn", "batch_size=8", "method.ghost_batch_size=1", "model=vgg11")
    with pytest.raises(ConfigError, match="1 example per virtual batch"):
        train(cfg, tmp_path)


def tiny_bn_net():
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(),
                         nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)).double()


def direct_statistics(net, batches):
    """Mean and unbiased variance over all batches of each BN layer's input, computed by
    running the layers by hand (each BN normalising by its own batch's statistics)."""
    conv1, _, _, conv2, _ = net
    first = [conv1(x) for x in batches]
    second = [conv2(torch.relu(nn.functional.batch_norm(h, None, None, net[1].weight, net[1].bias, training=True)))
              for h in first]
    out = []
    for inputs in (first, second):
        values = torch.cat([h.transpose(0, 1).flatten(1) for h in inputs], 1)
        out.append((values.mean(1), values.var(1)))
    return out


def test_precise_bn_statistics_are_the_mean_and_variance_over_the_batches():
    net = tiny_bn_net()
    batches = [torch.randn(4, 2, 6, 6, dtype=torch.float64) * (i + 1) + i for i in range(3)]
    with torch.no_grad():
        expected = direct_statistics(net, batches)
    net.eval()
    recompute_bn_statistics_(net, batches, Context())
    assert not net.training  # the mode is restored
    for layer, (mean, var) in zip((net[1], net[4]), expected):
        torch.testing.assert_close(layer.running_mean, mean)
        torch.testing.assert_close(layer.running_var, var)


def _precise_bn_on_half(batches, out_path, *, device, ctx):
    net = tiny_bn_net()
    mine = [x[ctx.rank * 2:(ctx.rank + 1) * 2] for x in batches]  # each rank: its half of every batch
    recompute_bn_statistics_(net, mine, ctx)
    torch.save([net[1].running_mean, net[1].running_var, net[4].running_mean], f"{out_path}.{ctx.rank}")


@pytest.mark.slow
def test_precise_bn_sums_the_statistics_over_processes(tmp_path):
    """Two gloo processes, each with half of every batch: the same statistics as one
    process over all the halves' inputs (every rank ends with the same values)."""
    batches = [torch.randn(4, 2, 6, 6, dtype=torch.float64) + i for i in range(2)]
    spawn(_precise_bn_on_half, [torch.device("cpu")] * 2, (batches, str(tmp_path / "stats")))
    rank0, rank1 = (torch.load(tmp_path / f"stats.{r}") for r in (0, 1))
    net = tiny_bn_net()
    halves = [x[:2] for x in batches] + [x[2:] for x in batches]
    with torch.no_grad():
        (mean1, var1), (mean2, _) = direct_statistics(net, halves)
    for a, b in zip(rank0, rank1):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(rank0[0], mean1)
    torch.testing.assert_close(rank0[1], var1)
    torch.testing.assert_close(rank0[2], mean2)


def test_precise_bn_in_a_run_recomputes_the_statistics_evaluation_uses(tmp_path):
    """With precise BN the saved running statistics are the ones recomputed on the
    epoch's first training micro-batches (not the EMA), and differ from a plain run's."""
    common = ["debug=quick", "method=bn", "batch_size=16", "trainer.accumulate=2", "epochs=1",
              "trainer.max_steps=6"]
    train(make_cfg(*common), tmp_path / "plain")
    train(make_cfg(*common, "method.precise_bn_batches=3"), tmp_path / "precise")
    plain = torch.load(tmp_path / "plain" / "checkpoints" / "last.pt", weights_only=True)["model"]
    precise = torch.load(tmp_path / "precise" / "checkpoints" / "last.pt", weights_only=True)["model"]
    key = "stem.1.running_mean"
    assert not torch.allclose(plain[key], precise[key])
    # Recompute by hand: the same weights, the replayed epoch's first 3 micro-batches of 8.
    from msr_train.data import build_data
    cfg = make_cfg(*common, "method.precise_bn_batches=3")
    data = build_data(cfg.dataset, batch_size=16, eval_batch_size=100, seed=cfg.seed, device=torch.device("cpu"))
    net = build_model("resnet8", build_method(cfg.method), in_channels=data.info.in_channels,
                      num_classes=data.info.num_classes, image_size=data.info.image_size)
    net.load_state_dict(precise)
    micro = [h for x, _ in list(data.train.replay(0))[:2] for h in x.chunk(2)][:3]
    recompute_bn_statistics_(net, micro, Context())
    torch.testing.assert_close(net.state_dict()[key], precise[key])


#: One architecture per family (CIFAR basic blocks, ImageNet basic blocks with the
#: small-input stem, bottlenecks, VGG): the BN options touch only the norm layers, which
#: the deeper members of a family repeat (test_all_methods builds every model with bn).
FAMILIES = ["resnet8", "resnet18", pytest.param("resnet50", marks=pytest.mark.slow), "vgg11"]


@pytest.mark.parametrize("model_name", FAMILIES)
def test_every_family_trains_with_ghost_and_precise_bn(model_name):
    """Ghost BN (virtual batches of 8) at batch 32 and 1 (where it is plain BN), three
    steps each, then precise BN's recalibration and an evaluation: finite throughout."""
    torch.manual_seed(0)
    method = build_method(method_cfg("bn", ghost_batch_size=8, precise_bn_batches=2))
    model = build_model(model_name, method, in_channels=1, num_classes=3, image_size=16)
    opt = build_optimizer(make_cfg("optimizer.lr=0.01").optimizer, method.param_groups(model), 32)
    for size in (32, 1):
        x, y = torch.randn(size, 1, 16, 16), torch.randint(3, (size,))
        if size == 1:
            try:
                check_batchnorm_trainable(model, 1, (1, 16, 16))
            except ConfigError:
                continue  # 1x1 maps: refused up front, as for plain BN
        losses = train_steps(model, method, opt, [(x, y)] * 3)
        assert all(math.isfinite(v) for v in losses)
    method.before_evaluation(model, lambda n: [torch.randn(8, 1, 16, 16)] * n, Context())
    assert all(torch.isfinite(m.running_var).all() for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    metrics = evaluate(model, [(torch.randn(4, 1, 16, 16), torch.randint(3, (4,)))], 3)
    assert math.isfinite(metrics["test_loss"])
