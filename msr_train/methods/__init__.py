"""Method registry. A method supplies layers and step hooks (see base.Method); every
module of this package is imported here, and each ``Method`` subclass with a ``name``
registers itself, so adding a method edits no list."""

from __future__ import annotations

import importlib
import pkgutil

from ..rules import unknown
from .base import Method

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

METHODS: dict[str, type[Method]] = dict(sorted(Method.registry.items()))


def build_method(cfg, batch_size: int | None = None, micro_batch: int | None = None) -> Method:
    """The method ``cfg`` describes, for a run whose optimizer steps see ``batch_size``
    examples (None: unknown, e.g. a model built outside a run) in forward passes of
    ``micro_batch`` examples per process (default: ``batch_size``)."""
    name = cfg.name
    if name not in METHODS:
        raise unknown("method", name, METHODS)
    method = METHODS[name](cfg, batch_size, micro_batch)
    method.check(cfg)
    return method
