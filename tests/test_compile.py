"""trainer.compile: the compiled model and step hooks compute what the eager ones do."""

import pytest
import torch

from conftest import make_cfg
from msr_train.clipping import GradientClipping
from msr_train.methods import build_method
from msr_train.models import build_model
from msr_train.train import train
from helpers import metrics

pytestmark = pytest.mark.slow  # compiles (torch.compile takes seconds per graph)


def hooked_gradients(method_name: str, compiled: bool, *overrides: str):
    """Fixed random gradients of a resnet8, and the same after the method's clipping and
    ``before_step``."""
    cfg = make_cfg(f"method={method_name}", *overrides)
    torch.manual_seed(0)
    method = build_method(cfg.method, batch_size=cfg.batch_size)
    model = build_model("resnet8", method, in_channels=1, num_classes=10, image_size=28)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    raw = [p.grad.clone() for p in model.parameters()]
    clip = GradientClipping(model, method.clipping())
    if compiled:
        method.compile_step_hooks()
        clip.compile("default")
    clip()
    method.before_step(model, optimizer=None)
    return raw, [p.grad for p in model.parameters()]


@pytest.mark.parametrize("method_name,overrides", [("msr", ()), ("msr", ("method.zmg_operator=authors",)),
                                                   ("nf", ("batch_size=1024",))])
def test_compiled_step_hooks_equal_eager(method_name, overrides, one_thread):
    """MSR's anchors + ZMG, nf's AGC (on at batch 1024)."""
    raw, eager = hooked_gradients(method_name, False, *overrides)
    _, compiled = hooked_gradients(method_name, True, *overrides)
    assert any(not torch.equal(r, e) for r, e in zip(raw, eager))  # the hooks did change something
    for e, c in zip(eager, compiled, strict=True):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method_name", ["msr", "nf"])
def test_compiled_run_matches_the_eager_run(tmp_path, method_name, one_thread):
    """A short run with trainer.compile=true logs the eager run's losses (to float32
    rounding through a different kernel order); nf's model holds a custom autograd node
    (its Scaled WS)."""
    common = ["debug=quick", f"method={method_name}", "trainer.max_steps=4", "epochs=1"]
    train(make_cfg(*common), tmp_path / "eager")
    train(make_cfg(*common, "trainer.compile=true"), tmp_path / "compiled")
    eager, compiled = metrics(tmp_path / "eager"), metrics(tmp_path / "compiled")
    assert [m["step"] for m in compiled] == [m["step"] for m in eager]
    for e, c in zip(eager, compiled, strict=True):
        for key in ("test_loss", "val_loss", "train_loss"):
            if key in e:
                assert c[key] == pytest.approx(e[key], rel=1e-3), key


@pytest.mark.parametrize("method_name", ["msr", "nf", "bnp", "mimicnorm", "none"])
def test_compiled_step_hooks_and_clipping_are_whole_graphs(method_name, one_thread):
    """Each step hook and the clipper compiles to at most one graph, with no graph break:
    a break runs the rest of the hook eagerly (a generator argument once did that to MSR's
    ZMG, which then ran op by op under trainer.compile)."""
    cfg = make_cfg(f"method={method_name}", "batch_size=1024")  # nf clips by AGC from 1024 on
    method = build_method(cfg.method, batch_size=cfg.batch_size)
    model = build_model("resnet8", method, in_channels=1, num_classes=10, image_size=28)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    method.ensure_bound(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    clip = GradientClipping(model, method.clipping())
    for name, fn, args in (("before_step", method.before_step, (model, optimizer)),
                           ("after_step", method.after_step, (model, optimizer)), ("clipping", clip._clip, ())):
        torch._dynamo.reset()
        explained = torch._dynamo.explain(fn)(*args)
        assert explained.graph_count <= 1 and not explained.break_reasons, (name, explained.break_reasons)
