"""Shared helpers: the real Hydra configs, composed the way the CLI composes them."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_module


def make_cfg(*overrides: str):
    """The full run config for these command-line overrides."""
    with initialize_config_module("msr_train.conf", version_base="1.3"):
        return compose("config", overrides=list(overrides))


@pytest.fixture
def cfg_factory():
    return make_cfg
