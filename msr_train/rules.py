"""Rules for config values: each config group's settings in one table (key -> Rule) that
lives beside the code the group configures, checked before any work starts.

A value that breaks its rule, a setting the group does not have (e.g. one added with
``+method.foo=1``) or one it lacks is a ConfigError that names the key, the value and
what is allowed. Booleans must be booleans (``maybe`` or ``1`` is not true), numbers
must be finite, and a bool is never taken for a number.

A rule also carries the setting's resume policy (state.changed_settings reads it): by
default a resumed run must keep the value its checkpoint was written with;
``resumable(rule)`` marks a setting that may change (where things are, how the run is
watched), and ``added_later(rule, value)`` a setting added after checkpoints were
written, with the value that trains as the code did before it existed (a checkpoint
without the setting resumes when the run has that value). Adding a setting is its YAML
key, its rule here (with its resume policy) and its use: nothing else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping

from omegaconf import OmegaConf

from .errors import ConfigError


#: Rule.added_with of a setting that checkpoints have always recorded.
NOT_ADDED = object()


@dataclass(frozen=True)
class Rule:
    ok: Callable[[Any], bool]
    #: What is allowed, completing "<key>=<value> must be ...".
    allowed: str
    #: False: the setting exists in some configs of the group only (e.g. model.small_input).
    required: bool = True
    #: True: a resumed run may change it (it moves files or changes what is watched).
    may_change_on_resume: bool = False
    #: For a setting added after checkpoints were written: the value that trains as before.
    added_with: Any = NOT_ADDED
    #: The value's canonical form, for settings written in more than one way (precision
    #: ``32`` or ``'32'``): the resume check compares canonical forms.
    canonical: Callable[[Any], Any] = lambda v: v  # noqa: E731 (an instance attribute: never bound)


def optional_key(rule: Rule) -> Rule:
    return replace(rule, required=False)


def resumable(rule: Rule) -> Rule:
    """A setting a resumed run may change (see the module docstring)."""
    return replace(rule, may_change_on_resume=True)


def added_later(rule: Rule, value) -> Rule:
    """A setting checkpoints written before it existed lack: they trained with ``value``."""
    return replace(rule, added_with=value)


def shown(v) -> str:
    """A value as it is written in an override: null, true, 2147483647 (not 2.14748e+09)."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:g}" if abs(v) < 1e15 else repr(v)
    return repr(v) if isinstance(v, str) else str(v)


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _range(lo, hi, lo_open: bool, hi_open: bool) -> tuple[Callable[[float], bool], str]:
    def ok(v):
        return ((lo is None or (v > lo if lo_open else v >= lo)) and
                (hi is None or (v < hi if hi_open else v <= hi)))
    if lo is not None and hi is not None:
        text = f"in {'(' if lo_open else '['}{shown(lo)}, {shown(hi)}{')' if hi_open else ']'}"
    elif lo is not None:
        text = f"{'>' if lo_open else '>='} {shown(lo)}"
    else:
        text = f"{'<' if hi_open else '<='} {shown(hi)}" if hi is not None else ""
    return ok, text


def _with_null(ok, allowed: str, null: bool, note: str) -> Rule:
    allowed = f"null or {allowed}" if null else allowed
    return Rule(lambda v: (null and v is None) or ok(v), f"{allowed} ({note})" if note else allowed)


def integer(lo=None, hi=None, *, null: bool = False, note: str = "") -> Rule:
    in_range, text = _range(lo, hi, False, False)
    return _with_null(lambda v: is_int(v) and in_range(v), f"an integer {text}".rstrip(), null, note)


def number(lo=None, hi=None, *, lo_open: bool = False, hi_open: bool = False, null: bool = False,
           note: str = "") -> Rule:
    in_range, text = _range(lo, hi, lo_open, hi_open)
    return _with_null(lambda v: is_number(v) and in_range(v), f"a number {text}".rstrip(), null, note)


def flag(note: str = "") -> Rule:
    return _with_null(lambda v: isinstance(v, bool), "true or false", False, note)


def choice(*values, note: str = "") -> Rule:
    # Exact types: True must not pass for 1, nor 1 for True.
    return _with_null(lambda v: any(type(v) is type(c) and v == c for c in values),
                      "one of " + ", ".join(c if isinstance(c, str) else shown(c) for c in values), False, note)


def text(note: str = "", *, null: bool = False) -> Rule:
    return _with_null(lambda v: isinstance(v, str) and v.strip() != "", "a non-empty string", null, note)


def numbers(lo=None, *, lo_open: bool = False, note: str = "") -> Rule:
    in_range, bound = _range(lo, None, lo_open, False)
    return _with_null(lambda v: isinstance(v, list) and len(v) > 0 and all(is_number(x) and in_range(x) for x in v),
                      f"a non-empty list of numbers {bound}".rstrip(), False, note)


def either(*rules: Rule) -> Rule:
    return Rule(lambda v: any(r.ok(v) for r in rules), " or ".join(r.allowed for r in rules))


def unknown(group: str, name, known) -> ConfigError:
    """The error for a config group choice (``group``=``name``, i.e. ``group``.name) that does not exist."""
    return ConfigError(f"{group}={name} ({group}.name) is unknown; choose one of: {', '.join(known)}")


#: The config groups (conf/<group>/); each but logger is chosen by its ``name``
#: (logger's choice is the trackers it holds).
CONFIG_GROUPS = ("model", "method", "dataset", "optimizer", "scheduler", "trainer", "logger")


def flatten(node: dict, prefix: str = "") -> dict[str, Any]:
    """A nested config (plain dicts) as dotted keys -> values: the one flattening the
    checks, the resume check and the loggers share."""
    out = {}
    for key, value in node.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def check_group(group: str, node, rules: Mapping[str, Rule], *, skip: tuple[str, ...] = ()) -> None:
    """Check every setting of config ``node`` (the ``group`` part of a run's config, ''
    for the top level) against ``rules`` (dotted keys for nested settings); ``skip``:
    sub-groups checked on their own."""
    values = flatten({k: v for k, v in OmegaConf.to_container(node, resolve=True).items() if k not in skip})
    prefix = f"{group}." if group else ""
    for key in values:
        if key not in rules:
            raise ConfigError(f"{prefix}{key} is not a setting of {group or 'the run'}; its settings are: "
                              f"{', '.join(rules)}")
    for key, rule in rules.items():
        if key not in values:
            if not rule.required:
                continue
            raise ConfigError(f"{prefix}{key} is missing: it must be {rule.allowed}")
        if not rule.ok(values[key]):
            raise ConfigError(f"{prefix}{key}={shown(values[key])} must be {rule.allowed}")
