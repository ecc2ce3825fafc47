"""The methods in one's own code: msr_train.method / convert / param_groups / attach on
torchvision and timm models, with SGD, AdamW, closures and copies."""

import copy

import pytest
import torch
import torchvision
from torch import nn

import msr_train
from helpers import batches, slice_drift
from msr_train.errors import ConfigError

pytestmark = pytest.mark.slow  # trains converted torchvision / timm models for a few steps
torch.set_num_threads(1)


def train(model, optimizer, data, *, closure=False):
    for x, y in data:
        def loss_fn():
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss
        if closure:
            optimizer.step(loss_fn)
        else:
            loss_fn()
            optimizer.step()


def no_batchnorm(model) -> bool:
    return not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@pytest.fixture(scope="module")
def resnet18():
    torch.manual_seed(0)
    return msr_train.convert(torchvision.models.resnet18(num_classes=10), "msr")


@pytest.mark.parametrize("make_optimizer, lr, closure", [
    (lambda groups: torch.optim.SGD(groups, momentum=0.9, weight_decay=5e-4), 0.05, False),
    (lambda groups: torch.optim.AdamW(groups, weight_decay=0.05), 1e-3, False),
    (lambda groups: torch.optim.SGD(groups, momentum=0.9), 0.05, True),
], ids=["sgd", "adamw", "closure"])
def test_converted_torchvision_resnet_stays_zero_mean(resnet18, make_optimizer, lr, closure):
    model = copy.deepcopy(resnet18)
    assert no_batchnorm(model) and slice_drift(model) < 1e-6
    optimizer = make_optimizer(msr_train.param_groups(model, lr=lr))
    handle = msr_train.attach(optimizer, model)
    before = [p.detach().clone() for p in model.parameters()]
    train(model, optimizer, batches(), closure=closure)
    assert slice_drift(model) < 1e-6
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))  # it trained
    handle.remove()  # detached: the next update leaves the zero-mean subspace
    train(model, optimizer, batches(1))
    assert slice_drift(model) > 1e-4


def test_a_deepcopy_with_a_fresh_optimizer_and_the_original_method(resnet18):
    """The issue's silent case: the hooks captured the original's tensors."""
    model = copy.deepcopy(resnet18)
    method = getattr(resnet18, "msr_train_method")
    optimizer = torch.optim.SGD(msr_train.param_groups(model, lr=0.05, method=method), momentum=0.9)
    msr_train.attach(optimizer, model, method)
    train(model, optimizer, batches())
    assert slice_drift(model) < 1e-6


def test_load_state_dict_assign_then_a_step_is_a_clear_error_never_drift(resnet18):
    model = copy.deepcopy(resnet18)
    optimizer = torch.optim.SGD(msr_train.param_groups(model, lr=0.05), momentum=0.9)
    msr_train.attach(optimizer, model)
    model.load_state_dict(copy.deepcopy(resnet18.state_dict()), assign=True)
    with pytest.raises(RuntimeError, match="optimizer does not hold .* load_state_dict"):
        train(model, optimizer, batches(1))
    assert slice_drift(model) < 1e-6
    fresh = torch.optim.SGD(msr_train.param_groups(model, lr=0.05), momentum=0.9)
    msr_train.attach(fresh, model)
    train(model, fresh, batches())
    assert slice_drift(model) < 1e-6


def test_param_groups_resolve_the_method_multipliers(resnet18):
    groups = msr_train.param_groups(resnet18, lr=0.1, weight_decay=1e-4)
    assert all("lr_mult" not in g for g in groups)
    convs = {id(m.weight) for m in resnet18.modules() if isinstance(m, nn.Conv2d)} - {id(resnet18.conv1.weight)}
    lrs = {g["lr"] for g in groups if any(id(p) in convs for p in g["params"])}
    assert sorted(lrs) == pytest.approx([0.4])
    head = next(g for g in groups if any(p is resnet18.fc.weight for p in g["params"]))
    assert head["lr"] == pytest.approx(0.1) and head["weight_decay"] == 1e-4
    n = sum(p.numel() for g in groups for p in g["params"])
    assert n == sum(p.numel() for p in resnet18.parameters())


def test_attach_refuses_an_optimizer_without_the_method_groups(resnet18):
    # model.parameters() drops MSR's 4x conv rate: silently another method, so refused
    with pytest.raises(ValueError, match="lr_mult.*msr_train.param_groups"):
        msr_train.attach(torch.optim.SGD(resnet18.parameters(), lr=0.1), resnet18)
    scheduled = torch.optim.SGD(msr_train.param_groups(resnet18, lr=0.1), momentum=0.9)
    torch.optim.lr_scheduler.LambdaLR(scheduled, lambda step: 0.01)  # the ratios are checked, not the rate
    msr_train.attach(scheduled, resnet18).remove()
    msr_train.attach(torch.optim.SGD(resnet18.parameters(), lr=0.1), resnet18, check_groups=False).remove()


def test_vgg_and_timm_resnet_convert_and_stay_zero_mean():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    for model in (torchvision.models.vgg11_bn(num_classes=10), timm.create_model("resnet18", num_classes=10)):
        msr_train.convert(model, "msr")
        assert no_batchnorm(model)
        optimizer = torch.optim.SGD(msr_train.param_groups(model, lr=0.02), momentum=0.9, weight_decay=5e-4)
        msr_train.attach(optimizer, model)
        train(model, optimizer, batches(3, batch=2))
        assert slice_drift(model) < 1e-6


@pytest.mark.parametrize("name", ["gn", "gn_ws", "bn", "bnp", "none"])
def test_other_batch_independent_methods_convert_and_train(name):
    torch.manual_seed(0)
    model = msr_train.convert(torchvision.models.resnet18(num_classes=10), name)
    norms = {type(m).__name__ for m in model.modules() if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm))}
    assert norms == {"bn": {"BatchNorm2d"}, "gn": {"GroupNorm"}, "gn_ws": {"GroupNorm"}}.get(name, set())
    optimizer = torch.optim.SGD(msr_train.param_groups(model, lr=0.01), momentum=0.9)
    msr_train.attach(optimizer, model)
    x, y = batches(1, batch=8)[0]
    losses = []
    for _ in range(8):  # one batch, learnt by heart: the loss falls
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(map(torch.isfinite, map(torch.tensor, losses))) and losses[-1] < losses[0]


@pytest.mark.parametrize("name", ["nf", "mimicnorm"])
def test_methods_that_change_the_architecture_are_refused(name):
    model = torchvision.models.resnet18(num_classes=10)
    with pytest.raises(ValueError, match="build_model"):
        msr_train.convert(model, name)
    assert isinstance(model.bn1, nn.BatchNorm2d)  # untouched


def test_layers_a_method_cannot_rebuild_are_named_and_the_model_left_as_it_was():
    model = torchvision.models.mobilenet_v3_small(num_classes=10)
    with pytest.raises(ValueError, match=r"layer 'features\.1\.block\.0\.0' .* groups=16"):
        msr_train.convert(model, "msr")
    assert isinstance(model.features[0][1], nn.BatchNorm2d)


def test_method_takes_its_defaults_from_its_config_and_refuses_bad_settings():
    m = msr_train.method("msr")
    assert m.cfg.lr_mult.conv == 4.0 and m.cfg.zmg_operator == "project"
    assert msr_train.method("msr_authors").cfg.zmg_operator == "authors"
    assert msr_train.method("msr", noise_at="conv", lr_mult={"conv": 2.0}).cfg.lr_mult == {
        "conv": 2.0, "other": 1.0, "stem": None}
    with pytest.raises(ConfigError, match="no setting 'noise'.*noise_at"):
        msr_train.method("msr", noise=0.1)
    with pytest.raises(ConfigError, match="method.noise_at='loud' must be one of"):
        msr_train.method("msr", noise_at="loud")
    with pytest.raises(ConfigError, match="no config conf/method/mrs.yaml.*msr"):
        msr_train.method("mrs")


def test_finalize_twice_is_refused():
    method = msr_train.method("msr")
    model = msr_train.build_model("resnet8", method, in_channels=1, num_classes=10, image_size=28)
    with pytest.raises(ValueError, match="already finalized.*re-initialise"):
        method.finalize(model)


def test_readme_example(tmp_path):
    """The README's "Use it in your own code" example, as written there."""
    from pathlib import Path
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    code = readme.split("<!-- api-example:start -->")[1].split("<!-- api-example:end -->")[0]
    code = code.split("```python")[1].split("```")[0]
    exec(compile(code, "README.md", "exec"), {})


@pytest.mark.parametrize("name, settings", [("nf", {"agc_clip": 0.01}), ("bnp", {"grad_clip_norm": 0.01})])
def test_attach_clips_as_the_methods_default_says_as_the_loop_does(name, settings):
    """nf's AGC and bnp's global-norm bound (Method.clipping()) act under attach exactly
    as in msr-train's step; without them the step would differ."""
    from msr_train.clipping import GradientClipping
    from msr_train.train import train_step
    x, y = batches(1, batch=8, channels=1, size=16)[0]
    weights = {}
    for path in ("loop", "attach", "unclipped"):
        torch.manual_seed(0)
        method = msr_train.method(name, batch_size=8, **settings)
        model = msr_train.build_model("resnet8", method, in_channels=1, num_classes=10, image_size=16)
        optimizer = torch.optim.SGD(msr_train.param_groups(model, lr=0.1), lr=0.1)
        if path == "loop":
            train_step(model, method, optimizer, x, y, on_gradients=GradientClipping(model, method.clipping()))
        else:
            if path == "attach":
                msr_train.attach(optimizer, model)
            nn.functional.cross_entropy(model(x), y).backward()
            if path == "unclipped":
                method.before_step(model, optimizer)
            optimizer.step()
            if path == "unclipped":
                method.after_step(model, optimizer)
        weights[path] = model.state_dict()
    assert all(torch.equal(weights["loop"][k], weights["attach"][k]) for k in weights["loop"])
    assert not all(torch.equal(weights["loop"][k], weights["unclipped"][k]) for k in weights["loop"])
