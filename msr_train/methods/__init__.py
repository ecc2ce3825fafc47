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


def build_method(cfg, batch_size: int | None = None) -> Method:
    """The method ``cfg`` describes, for a run whose optimizer steps see ``batch_size``
    examples (None: unknown, e.g. a model built outside a run)."""
    name = cfg.name
    if name not in METHODS:
        raise ConfigError(f"method={name} is unknown; choose one of: {', '.join(METHODS)}")
    method = METHODS[name](cfg, batch_size)
    method.check(cfg)
    return method
