"""Shared helpers: the real Hydra configs, composed the way the CLI composes them."""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_module
from hypothesis import settings

# Property-based tests draw 100 examples by default; `pytest --hypothesis-profile=thorough`
# draws 2000 (a few minutes more), worth it after changing a config rule.
settings.register_profile("thorough", max_examples=2000)


def make_cfg(*overrides: str):
    """The full run config for these command-line overrides."""
    with initialize_config_module("msr_train.conf", version_base="1.3"):
        return compose("config", overrides=list(overrides))


@pytest.fixture(scope="module")
def one_thread():
    """Tensors this small gain nothing from more threads, and a second thread makes the
    run many times slower when other processes compete for the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def cfg_factory():
    return make_cfg


def method_cfg(name: str, **overrides):
    """A method's config from conf/method/<name>.yaml with some keys overridden."""
    return make_cfg(f"method={name}", *(f"method.{k}={v}" for k, v in overrides.items())).method


def train_steps(model, method, optimizer, batches):
    """The loop's optimizer step (msr_train.train.train_step) on each batch: the losses."""
    from msr_train.train import train_step
    model.train()
    return [float(train_step(model, method, optimizer, x, y)[0]) / len(y) for x, y in batches]
