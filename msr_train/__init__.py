"""msr-train: train ResNet and VGG classifiers with or without BatchNorm and compare.

The public API (README, "Use it in your own code"): ``method``, ``build_model``,
``convert``, ``param_groups``, ``attach`` and ``load_run``. They are imported on first use,
so ``import msr_train.compare`` does not load torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

#: Public name -> the module that defines it.
_API = {"method": "api", "convert": "api", "param_groups": "api", "attach": "api",
        "build_model": "models", "load_run": "load"}
__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module 'msr_train' has no attribute {name!r}")
