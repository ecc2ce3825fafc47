"""Model registry: every architecture is built from a method (see methods.base). Each
module of this package that defines ``ARCHITECTURES`` (name -> builder) registers them
by being here, so adding an architecture family is one module and its conf/model files:
no list to edit."""

from __future__ import annotations

import importlib
import pkgutil

from torch import nn

from ..rules import choice, either, flag, optional_key, unknown
from ..methods.base import Method


def _registered() -> dict:
    found = {}
    for module in pkgutil.iter_modules(__path__):
        for name, builder in getattr(importlib.import_module(f"{__name__}.{module.name}"), "ARCHITECTURES", {}).items():
            if name in found:
                raise ImportError(f"architecture {name!r} is defined twice (msr_train.models.{module.name})")
            found[name] = builder
    return found


ARCHITECTURES = _registered()

#: Inputs up to this size get the small-image stem / classifier.
SMALL_INPUT_MAX_PX = 64
#: model.* settings (small_input: ImageNet ResNets and VGG only).
MODEL_RULES = {
    "name": choice(*ARCHITECTURES),
    "small_input": optional_key(either(choice("auto", note=f"inputs of {SMALL_INPUT_MAX_PX} px or less"), flag())),
}


def build_model(name: str, method: Method, *, in_channels: int, num_classes: int,
                image_size: int, small_input: bool | str = "auto") -> nn.Module:
    if name not in ARCHITECTURES:
        raise unknown("model", name, ARCHITECTURES)
    if small_input == "auto":
        small_input = image_size <= SMALL_INPUT_MAX_PX
    model = ARCHITECTURES[name](method, in_channels=in_channels, num_classes=num_classes,
                                small_input=bool(small_input))
    method.finalize(model)
    return model
