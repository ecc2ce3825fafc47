"""Shared helpers: the real Hydra configs, composed the way the CLI composes them."""

from __future__ import annotations

import os
import time

import pytest
import torch
from hydra import compose, initialize_config_module
from hypothesis import settings

from helpers import processes_started_with

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


#: Set in each test process's environment, so every process a test starts carries it.
OWNER_ENV = "MSR_TRAIN_TEST_OWNER"


@pytest.fixture(scope="session", autouse=True)
def no_process_left_behind():
    """When a test process has run its tests, no process they started still runs (an
    orphaned sweep worker, a server, a run never waited for): each is named in the error.
    Python's multiprocessing resource tracker is the exception: it serves this process and
    ends with it."""
    os.environ[OWNER_ENV] = str(os.getpid())
    yield
    deadline = time.monotonic() + 10  # what was just stopped may still be exiting
    while left := {pid: cmd for pid, cmd in processes_started_with(OWNER_ENV, str(os.getpid())).items()
                   if "resource_tracker" not in cmd}:
        if time.monotonic() > deadline:
            pytest.fail(f"processes the tests started still run after the tests: {left}")
        time.sleep(0.5)
