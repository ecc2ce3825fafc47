"""Property-based: random values thrown at the config fail with a clear error that names
the key (or train), never with a traceback from deep inside."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import make_cfg
from msr_train.checks import check_writable
from msr_train.errors import ConfigError
from msr_train.methods import METHODS
from msr_train.train import train

BASE = ["dataset=synthetic", "dataset.synthetic_train=64", "dataset.synthetic_test=16", "dataset.image_size=8",
        "model=resnet8", "batch_size=8", "epochs=1", "trainer.max_steps=2",
        "trainer.progress_bar=false", "trainer.tensorboard=false", "trainer.checkpoint=false"]

KEYS = ["batch_size", "epochs", "seed", "trainer.accumulate", "trainer.max_steps", "trainer.eval_every",
        "trainer.eval_batch_size", "trainer.log_every", "trainer.cpu_threads", "trainer.accelerator",
        "trainer.resume", "optimizer.lr", "optimizer.momentum", "optimizer.weight_decay", "optimizer.lr_scaling",
        "optimizer.base_batch_size", "scheduler.warmup_epochs", "dataset.train_size", "dataset.test_size",
        "dataset.val_size", "dataset.split_seed", "trainer.test_every_eval", "trainer.checkpoint", "method.lr"]
# Each method's own keys, from the rules its check() applies.
METHOD_KEYS = {name: [f"method.{k}" for k in (*cls.number_rules, *cls.flag_keys)] for name, cls in METHODS.items()}
METHOD_KEYS["nf"] += ["method.activation", "method.agc_clip"]
METHOD_KEYS["msr"] += ["method.zmg_operator", "method.stem", "method.noise_at", "method.weight_decay"]
METHOD_KEYS["mimicnorm"] += ["method.min_micro_batch"]

# Values as a user types them on the command line (Hydra's override grammar).
VALUES = st.one_of(
    st.integers(-3, 40).map(str),
    st.sampled_from(["0", "1", "2", "1e9", "-1e9", "0.5", "-0.5", "1e-12", "nan", "inf", "-inf", "null",
                     "true", "false", "cuda", "cpu", "auto", "never", "sqrt", "abc", "[1,2]", "''"]),
    st.floats(-10, 10, allow_nan=False).map(lambda v: repr(v)),
)


@st.composite
def method_and_key(draw):
    method = draw(st.sampled_from(sorted(METHODS)))
    return method, draw(st.sampled_from(KEYS + METHOD_KEYS[method]))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(method_key=method_and_key(), value=VALUES)
def test_any_value_trains_or_fails_clearly(tmp_path_factory, method_key, value):
    method, key = method_key
    cfg = make_cfg(*BASE, f"method={method}", f"{key}={value}")
    threads = torch.get_num_threads()
    try:
        summary = train(cfg, tmp_path_factory.mktemp("run"))
    except ConfigError as e:
        assert key in str(e) or key.split(".")[-1] in str(e), (key, value, str(e))
        return
    finally:
        torch.set_num_threads(threads)
    assert summary["status"] in ("completed", "diverged")


def test_unwritable_or_full_output_dir_is_reported_before_training(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ConfigError, match="not writable.*hydra.run.dir"):
        check_writable(blocker / "run")
    with pytest.raises(ConfigError, match="MB free"):
        check_writable(tmp_path, need_mb=10**12)
