"""Method registry. A method supplies layers and step hooks (see base.Method)."""

from __future__ import annotations

from ..errors import ConfigError
from .base import Method
from .bn import BatchNorm
from .bnp import BNPreconditioning
from .mimicnorm import MimicNorm
from .msr import MeanShiftRejection
from .nf import NormalizerFree
from .none import NoNorm

METHODS: dict[str, type[Method]] = {cls.name: cls for cls in (
    BatchNorm, NoNorm, MeanShiftRejection, NormalizerFree, MimicNorm, BNPreconditioning)}


def build_method(cfg) -> Method:
    name = cfg.name
    if name not in METHODS:
        raise ConfigError(f"method={name} is unknown; choose one of: {', '.join(METHODS)}")
    method = METHODS[name](cfg)
    method.check(cfg)
    return method
