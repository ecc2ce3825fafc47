"""Property-based: random values thrown at the config fail with a clear error that names
the key (or train), never with a traceback from deep inside."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from conftest import make_cfg
from msr_train.checks import check_writable, select_devices, validate_config
from msr_train.errors import ConfigError
from msr_train.methods import METHODS
from msr_train.state import changed_settings
from msr_train.train import train

BASE = ["debug=quick", "dataset.synthetic_train=64", "dataset.synthetic_test=16", "dataset.image_size=8",
        "batch_size=8", "epochs=1", "trainer.max_steps=2", "trainer.checkpoint=false"]


def keys_of(*overrides) -> list[str]:
    """Every setting of the composed config, as dotted keys."""
    def walk(prefix, node):
        for k, v in node.items():
            yield from walk(f"{prefix}{k}.", v) if isinstance(v, dict) else [f"{prefix}{k}"]
    return list(walk("", OmegaConf.to_container(make_cfg(*BASE, *overrides))))


# Every key of every group: the defaults, then each other method, optimizer, scheduler
# and a model with small_input (each adds its group's own keys).
VARIANTS = [f"method={m}" for m in METHODS] + ["optimizer=adamw", "scheduler=multistep", "scheduler=constant",
                                               "model=resnet18"]
CASES = sorted({((), key) for key in keys_of()} | {
    ((variant,), key) for variant in VARIANTS for key in keys_of(variant)
    if key.startswith(variant.split("=")[0] + ".")})

# Values as a user types them on the command line (Hydra's override grammar).
VALUES = st.one_of(
    st.integers(-3, 40).map(str),
    st.sampled_from(["0", "1", "2", "1e9", "-1e9", "1e308", "0.5", "-0.5", "1e-12", "nan", "inf", "-inf", "null",
                     "true", "false", "maybe", "cuda", "cpu", "auto", "never", "sqrt", "abc", "[1,2]", "[0.5]",
                     "[]", "[abc]", "''"]),
    st.floats(-10, 10, allow_nan=False).map(lambda v: repr(v)),
)


def trains_or_names_the_key(tmp_path, key, *overrides):
    cfg = make_cfg(*BASE, *overrides)
    threads = torch.get_num_threads()
    try:
        summary = train(cfg, tmp_path)
    except ConfigError as e:
        assert key in str(e), (key, overrides, str(e))
        return None
    finally:
        torch.set_num_threads(threads)
    assert summary["status"] in ("completed", "diverged")
    return summary


def test_every_key_of_every_group_is_covered():
    keys = {key for _, key in CASES}
    assert {"trainer.divergence_factor", "scheduler.gamma", "optimizer.betas", "method.noise_delta",
            "method.sync_bn", "model.small_input", "dataset.synthetic_seed"} <= keys
    assert len(keys) > 80


@pytest.mark.slow
@settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=st.sampled_from(CASES), value=VALUES)
def test_any_value_of_any_key_trains_or_fails_naming_the_key(tmp_path_factory, case, value):
    variant, key = case
    trains_or_names_the_key(tmp_path_factory.mktemp("run"), key, *variant, f"{key}={value}")


# The values that were silently accepted or ended in a traceback (issue: "nothing
# silently wrong"), each with the key its error must name.
REPORTED = [
    (["scheduler.min_lr_ratio=-1"], "scheduler.min_lr_ratio"), (["scheduler.min_lr_ratio=5"], "scheduler.min_lr_ratio"),
    (["scheduler.min_lr_ratio=abc"], "scheduler.min_lr_ratio"),
    (["scheduler=multistep", "scheduler.gamma=-1"], "scheduler.gamma"),
    (["scheduler=multistep", "scheduler.gamma=abc"], "scheduler.gamma"),
    (["scheduler=multistep", "scheduler.milestones=abc"], "scheduler.milestones"),
    (["trainer.checkpoint=no"], "trainer.checkpoint"), (["trainer.progress_bar=maybe"], "trainer.progress_bar"),
    (["dataset.augment=rotate"], "dataset.augment"), (["dataset.random_erasing=1.5"], "dataset.random_erasing"),
    (["trainer.stop_at_val_acc=90"], "trainer.stop_at_val_acc"),
    (["trainer.ema_decay=1"], "trainer.ema_decay"),
    (["method=msr", "method.noise_delta=5"], "method.noise_delta"),
    (["+method.foo=1"], "method.foo"), (["+trainer.foo=1"], "trainer.foo"), (["+foo=1"], "foo"),
    (["optimizer.lr=1e308"], "optimizer.lr"), (["dataset.num_classes=1"], "dataset.num_classes"),
    (["optimizer.momentum=0", "optimizer.nesterov=true"], "optimizer.nesterov"),
    (["optimizer=adamw", "optimizer.betas=[0.9]"], "optimizer.betas"),
    (["optimizer=adamw", "optimizer.betas=[1.5,0.999]"], "optimizer.betas"),
    (["optimizer=adamw", "optimizer.betas=abc"], "optimizer.betas"),
    (["dataset.mean=[abc]"], "dataset.mean"), (["dataset.std=[0,0.3,0.3]"], "dataset.std"),
    (["dataset.std=[0.3]"], "dataset.std"), (["method=bn", "method.sync_bn=maybe"], "method.sync_bn"),
    (["trainer.devices=3"], "trainer.devices"),
    # once accepted silently or with a misleading message
    (["scheduler=multistep", "scheduler.milestones=[]"], "scheduler.milestones"),
    (["scheduler.warmup_epochs=1"], "scheduler.warmup_epochs"),  # epochs=1: warming up to the end
    (["dataset.train_size=1000"], "dataset.train_size"), (["dataset.test_size=1000"], "dataset.test_size"),
    (["trainer.devices=[0,0]"], "trainer.devices"), (["trainer.devices=[0]"], "trainer.devices"),
]


@pytest.mark.parametrize("overrides,key", REPORTED, ids=[" ".join(o) for o, _ in REPORTED])
def test_each_reported_bad_value_names_its_key_before_any_work(tmp_path, overrides, key):
    assert trains_or_names_the_key(tmp_path, key, *overrides) is None
    assert not (tmp_path / "metrics.jsonl").exists()


def test_messages_show_values_as_they_are_written():
    with pytest.raises(ConfigError, match=r"seed=-1 must be an integer in \[0, 2147483647\]$"):
        validate_config(make_cfg(*BASE, "seed=-1"))
    with pytest.raises(ConfigError, match="trainer.accumulate=null must be an integer >= 1$"):
        validate_config(make_cfg(*BASE, "trainer.accumulate=null"))
    with pytest.raises(ConfigError, match="trainer.devices=\\[0\\] names GPU ids, but the run is on the CPU"):
        select_devices(make_cfg(*BASE, "trainer.devices=[0]", "trainer.accelerator=cpu").trainer)


def test_a_resume_compares_settings_as_values_and_names_removed_ones(tmp_path):
    # trainer.precision='32' (text) and the default 32 (a number) are one setting: the
    # finished run is found finished (a changed setting would be refused).
    first = train(make_cfg(*BASE, "trainer.checkpoint=true", "trainer.precision='32'"), tmp_path)
    assert train(make_cfg(*BASE, "trainer.checkpoint=true"), tmp_path) == first
    saved = OmegaConf.to_container(make_cfg(*BASE, "method=msr", "+method.extra=0.0005"), resolve=True)
    assert "method.extra: 0.0005 -> (not set)" in changed_settings(saved, make_cfg(*BASE, "method=msr"))


def test_a_named_dataset_has_its_own_number_of_classes():
    with pytest.raises(ConfigError, match="dataset.num_classes=5 must be one of 10 .fashion_mnist has 10 classes"):
        validate_config(make_cfg("dataset=fashion_mnist", "dataset.num_classes=5"))


def test_unwritable_or_full_output_dir_is_reported_before_training(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ConfigError, match="not writable.*hydra.run.dir"):
        check_writable(blocker / "run")
    with pytest.raises(ConfigError, match="(bytes|[KMGT]B) free, need at least"):
        check_writable(tmp_path, need_mb=10**12)
