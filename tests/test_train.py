"""The loop itself, in-process: determinism, accumulation, schedules, lr scaling."""

import json
import math

import pytest
import torch

from conftest import make_cfg
from helpers import metrics
from msr_train.optim import build_scheduler, scaled_lr
from msr_train.train import Run, train

QUICK = ["debug=quick"]


@pytest.mark.parametrize("method", ["bn", "msr"])
def test_same_seed_same_metrics_on_cpu(tmp_path, method):
    cfg = make_cfg(*QUICK, f"method={method}")
    train(cfg, tmp_path / "a")
    train(cfg, tmp_path / "b")
    assert metrics(tmp_path / "a") == metrics(tmp_path / "b")
    train(make_cfg(*QUICK, f"method={method}", "seed=1"), tmp_path / "c")
    assert metrics(tmp_path / "a") != metrics(tmp_path / "c")


def test_accumulation_equals_the_full_batch_without_batch_statistics(tmp_path):
    # With no batch statistics (method=none), K micro-batches of B/K give the same step as one batch of B.
    common = [*QUICK, "method=none", "trainer.max_steps=5", "epochs=1"]
    train(make_cfg(*common), tmp_path / "full")
    train(make_cfg(*common, "trainer.accumulate=4"), tmp_path / "acc")
    a, b = metrics(tmp_path / "full")[-1], metrics(tmp_path / "acc")[-1]
    assert a["step"] == b["step"] == 5
    assert a["test_loss"] == pytest.approx(b["test_loss"], rel=1e-4)


def test_max_steps_caps_training(tmp_path):
    summary = train(make_cfg(*QUICK, "trainer.max_steps=3"), tmp_path / "r")
    assert summary["step"] == 3 and summary["examples_seen"] == 96


def test_divergence_is_recorded(tmp_path):
    summary = train(make_cfg(*QUICK, "method=none", "optimizer.lr=1e6", "trainer.log_every=1"), tmp_path / "r")
    assert summary["status"] == "diverged" and summary["step"] >= 1
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["status"] == "diverged"


@pytest.mark.parametrize("scaling,expected", [("none", 0.1), ("linear", 0.1 / 128), ("sqrt", 0.1 / math.sqrt(128))])
def test_lr_scaling(scaling, expected):
    cfg = make_cfg(f"optimizer.lr_scaling={scaling}").optimizer
    assert scaled_lr(cfg, 1) == pytest.approx(expected)
    assert scaled_lr(cfg, 128) == pytest.approx(0.1)


def lr_trace(scheduler_overrides, steps_per_epoch=10, total_steps=30):
    """The lr at every step of a 3-epoch run under the scheduler these overrides make."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = build_scheduler(make_cfg(*scheduler_overrides).scheduler, opt, steps_per_epoch=steps_per_epoch,
                            total_steps=total_steps)
    lrs = []
    for _ in range(total_steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def test_warmup_then_cosine_and_multistep():
    lrs = lr_trace(["scheduler=cosine", "scheduler.warmup_epochs=1"])
    assert lrs[:10] == pytest.approx([(i + 1) / 10 for i in range(10)])
    assert lrs[10] == pytest.approx(1.0) and lrs[20] == pytest.approx(0.5) and lrs[-1] < 0.01
    lrs = lr_trace(["scheduler=multistep", "scheduler.milestones=[1,2]"])
    assert lrs[9] == 1.0 and lrs[10] == pytest.approx(0.1) and lrs[20] == pytest.approx(0.01)

def test_top5_is_reported_for_more_than_ten_classes(tmp_path):
    train(make_cfg(*QUICK, "dataset.num_classes=20", "trainer.max_steps=2"), tmp_path / "r")
    record = metrics(tmp_path / "r")[-1]
    assert 0 <= record["test_acc"] <= record["test_top5"] <= 1


def test_each_method_brings_its_own_default_lr_and_an_override_wins():
    assert make_cfg("method=bnp").optimizer.lr == 0.03
    assert make_cfg("method=nf").optimizer.lr == 0.2
    assert make_cfg("method=bn").optimizer.lr == 0.1
    assert make_cfg("method=bnp", "optimizer.lr=0.02").optimizer.lr == 0.02
    assert make_cfg("method=nf", "method.lr=0.5").optimizer.lr == 0.5


@pytest.mark.parametrize("scaling,batch,expected", [("sqrt_linear", 1, 0.1 / math.sqrt(128)),
                                                    ("sqrt_linear", 1024, 0.8), ("sqrt", 1024, 0.1 * math.sqrt(8))])
def test_sqrt_below_linear_above(scaling, batch, expected):
    cfg = make_cfg("method=bn", f"optimizer.lr_scaling={scaling}").optimizer
    assert scaled_lr(cfg, batch) == pytest.approx(expected)


def test_train_loss_and_lr_reach_tensorboard_at_every_log_point(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    summary = train(make_cfg(*QUICK, "logger=tensorboard", "trainer.log_every=2", "method=none"), tmp_path)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    losses, lrs = events.Scalars("train/loss"), events.Scalars("lr")
    assert [e.step for e in losses] == [e.step for e in lrs] == [32 * s for s in range(2, 17, 2)]
    # Each point is the mean over its own 2 steps; the epoch's 4 points average to the epoch's window.
    assert sum(e.value for e in losses[:4]) / 4 == pytest.approx(records[0]["train_loss"], rel=1e-5)
    assert sum(e.value for e in losses[4:]) / 4 == pytest.approx(records[1]["train_loss"], rel=1e-5)
    assert lrs[-1].value == pytest.approx(records[-1]["lr"]) and summary["step"] == 16


def test_the_logged_lr_is_the_base_rate_every_method_shares(tmp_path):
    """msr trains its convs at 4x optimizer.lr; the logged lr is the shared base rate, so
    msr's curve reads bn's at the same step with the same optimizer.lr."""
    logged = {}
    for method in ("bn", "msr"):
        train(make_cfg(*QUICK, f"method={method}", "optimizer.lr=0.05", "scheduler.warmup_epochs=1"), tmp_path / method)
        logged[method] = [json.loads(line)["lr"] for line in (tmp_path / method / "metrics.jsonl").read_text().splitlines()]
    assert logged["msr"] == pytest.approx(logged["bn"]) and len(logged["bn"]) == 2
    # Epoch 1 ends the warmup: the base rate, optimizer.lr sqrt-scaled from batch 128 to 32.
    assert logged["bn"][0] == pytest.approx(0.05 * math.sqrt(32 / 128))


def test_the_resume_policy_is_read_from_the_settings_rules(monkeypatch):
    """Adding a setting is its YAML key, its rule and its use: the resume check takes the
    policy from the rule (a scratch setting here), no second list."""
    from omegaconf import OmegaConf, open_dict
    from msr_train import checks
    from msr_train.rules import added_later, integer, resumable
    from msr_train.state import changed_settings
    monkeypatch.setitem(checks.TRAINER_RULES, "scratch", added_later(integer(0), 3))
    monkeypatch.setitem(checks.TRAINER_RULES, "log_every", integer(1))  # no longer resumable
    cfg = make_cfg(*QUICK)
    saved = OmegaConf.to_container(cfg, resolve=True)  # written before trainer.scratch existed
    with open_dict(cfg):
        cfg.trainer.scratch = 3
    assert changed_settings(saved, cfg) == []
    cfg.trainer.scratch = 4
    cfg.trainer.log_every = 7
    assert changed_settings(saved, cfg) == ["trainer.log_every: 20 -> 7", "trainer.scratch: 3 -> 4"]
    monkeypatch.setitem(checks.TRAINER_RULES, "log_every", resumable(integer(1)))
    assert changed_settings(saved, cfg) == ["trainer.scratch: 3 -> 4"]


@pytest.mark.parametrize("on", [False, True])
def test_mean_shift_charts_only_when_asked_for(tmp_path, on):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    train(make_cfg(*QUICK, "logger=tensorboard", f"trainer.mean_shift={str(on).lower()}"), tmp_path)
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    charts = [t for t in events.Tags()["scalars"] if t.startswith("mean_shift/")]
    assert len(charts) == (7 if on else 0)  # ResNet-8: stem + 3 blocks x 2 convs


def test_label_smoothing_trains_on_the_smoothed_loss():
    from msr_train.methods import build_method
    from msr_train.train import train_step
    method = build_method(make_cfg("method=none").method)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 5))
    x, y = torch.randn(6, 3, 2, 2), torch.randint(5, (6,))
    # By hand: (1 - eps) x cross-entropy + eps x the mean over classes of -log p.
    logp = torch.log_softmax(net(x), 1)
    expected = (0.9 * -logp[torch.arange(6), y] - 0.1 * logp.mean(1)).mean()
    expected.backward()
    grads = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    seen = {}
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    loss_sum, _ = train_step(net, method, opt, x, y, label_smoothing=0.1,
                             on_gradients=lambda: seen.update(g=[p.grad.clone() for p in net.parameters()]))
    assert float(loss_sum) / 6 == pytest.approx(float(expected.detach()), rel=1e-6)
    for got, want in zip(seen["g"], grads):
        torch.testing.assert_close(got, want)


def test_a_checkpoint_from_before_a_setting_existed_resumes_at_the_settings_old_behaviour():
    """Settings added later (their rule's ``added_later`` value) are filled in with the value
    that trains as before; one whose old value is null once compared None with the config's "null"."""
    from omegaconf import OmegaConf
    from msr_train.state import changed_settings
    cfg = make_cfg(*QUICK)
    saved = OmegaConf.to_container(cfg, resolve=True)
    for key in ("ema_decay", "grad_clip_norm", "agc_clip", "label_smoothing"):
        del saved["trainer"][key]
    assert changed_settings(saved, make_cfg(*QUICK, "trainer.label_smoothing=0")) == []
    assert changed_settings(saved, make_cfg(*QUICK, "trainer.label_smoothing=0", "trainer.ema_decay=0.9")) == [
        "trainer.ema_decay: null -> 0.9"]


@pytest.mark.parametrize("value,mode", [("true", "default"), ("reduce-overhead", "reduce-overhead"),
                                        ("max-autotune", "max-autotune")])
def test_trainer_compile_chooses_torch_compiles_mode_for_the_model_and_the_hooks(tmp_path, monkeypatch, value, mode):
    modes = []

    def recording_compile(fn, mode=None):  # records the mode; runs eagerly
        modes.append(mode)
        return fn
    monkeypatch.setattr(torch, "compile", recording_compile)
    summary = train(make_cfg("debug=quick", "trainer.max_steps=1", f"trainer.compile={value}"), tmp_path)
    assert summary["status"] == "completed" and modes == [mode] * 4  # the model, before_step, after_step, the clipper


@pytest.mark.parametrize("flush", [True, False])
def test_a_cpu_run_flushes_denormals_unless_told_not_to_and_only_while_it_runs(tmp_path, flush):
    """trainer.flush_denormal: a float32 denormal (1e-39) reads as zero in the run's
    arithmetic when flushed and keeps its value when not; after the run, as before it
    (the setting is the thread's: Python's floats too)."""
    seen = []
    cfg = make_cfg("debug=quick", "trainer.max_steps=1", f"trainer.flush_denormal={str(flush).lower()}")
    with pytest.MonkeyPatch.context() as mp:
        real = Run.fit
        mp.setattr(Run, "fit", lambda self, stop: seen.append(float(torch.tensor([1e-39]) * 1.0)) or real(self, stop))
        assert train(cfg, tmp_path)["status"] == "completed"
    assert (seen[0] == 0.0) is flush and (flush or seen[0] == pytest.approx(1e-39, rel=1e-3))
    assert float(torch.tensor([1e-39]) * 1.0) == pytest.approx(1e-39, rel=1e-3) and math.ldexp(1.0, -1060) * 1.0 > 0


def test_trainer_compile_refuses_other_modes_and_resumes_true_as_default(tmp_path):
    from msr_train.checks import validate_config
    from msr_train.errors import ConfigError
    from msr_train.state import changed_settings
    from omegaconf import OmegaConf
    with pytest.raises(ConfigError, match="trainer.compile='fast' must be true or false or one of default, "
                                          "reduce-overhead, max-autotune"):
        validate_config(make_cfg("debug=quick", "trainer.compile=fast"))
    saved = OmegaConf.to_container(make_cfg("debug=quick", "trainer.compile=true"), resolve=True)
    assert changed_settings(saved, make_cfg("debug=quick", "trainer.compile=default")) == []
    assert changed_settings(saved, make_cfg("debug=quick")) == ["trainer.compile: true -> false"]


def test_the_optimizer_is_torchs_fused_one_where_torch_has_it():
    from msr_train.optim import build_optimizer, fused_supported
    for name in ("sgd", "adamw"):
        cfg = make_cfg(f"optimizer={name}").optimizer
        assert build_optimizer(cfg, [{"params": [torch.nn.Parameter(torch.ones(3))]}], 128).defaults["fused"]
    assert not fused_supported([{"params": [torch.nn.Parameter(torch.ones(3, device="meta"))]}])
