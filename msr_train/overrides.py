"""The command line's overrides, checked before Hydra composes them. A misspelled key or
config choice, or an override Hydra's grammar cannot read, is one line that names it,
says what would be right (a did-you-mean, the choices) and exits 2 before any work.
Hydra's own messages suggest ``+key=value`` (the wrong fix for a typo), exit 1 (a
diverged run's code) and, for a very long key, end in a traceback. A launcher or sweeper
whose plugin is not installed names the extra that installs it, and a sweep's jobs are
all checked before the first one trains (``check_sweep``)."""

from __future__ import annotations

import difflib
import importlib.util
import re
from importlib import resources

from hydra import compose, initialize_config_module
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra._internal.utils import get_args_parser
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, Override
from hydra.errors import HydraException
from omegaconf import OmegaConf

from .errors import ConfigError

CONFIG_MODULE = "msr_train.conf"
#: Longest part of a dotted key; longer ones are refused (Hydra looks parts up as files).
MAX_KEY_PART = 100
#: Hydra plugins of the ``launchers`` extra: (group, option) -> the module that provides it.
PLUGINS = {("hydra/launcher", "joblib"): "hydra_plugins.hydra_joblib_launcher",
           ("hydra/launcher", "submitit_local"): "hydra_plugins.hydra_submitit_launcher",
           ("hydra/launcher", "submitit_slurm"): "hydra_plugins.hydra_submitit_launcher",
           ("hydra/sweeper", "optuna"): "hydra_plugins.hydra_optuna_sweeper",
           ("hparams_search", "lr_optuna"): "hydra_plugins.hydra_optuna_sweeper"}


def config_groups() -> dict[str, list[str]]:
    """Each config group of conf/ and its options (the YAML files in its folder)."""
    root = resources.files(CONFIG_MODULE)
    return {group.name: sorted((f.name.removesuffix(".yaml") for f in group.iterdir() if f.name.endswith(".yaml")),
                               key=natural_order)
            for group in root.iterdir() if group.is_dir() and not group.name.startswith("__")}


def check_command_line(argv: list[str]) -> None:
    """Raise ConfigError for the first override of ``argv`` that Hydra cannot read, that
    chooses a config that does not exist, or that sets a key the config does not have."""
    for arg in argv:
        if arg.startswith("--") and "=" not in arg and arg[2:] in config_groups():
            raise ConfigError(f"{arg}: overrides are written key=value, without dashes, e.g. {arg[2:]}=msr")
    args, _ = get_args_parser().parse_known_args(argv)
    parsed = [parse(text) for text in args.overrides]
    groups = config_groups()
    for override in parsed:
        check_plugin(override)
        if override.key_or_group in groups:
            check_choices(override, groups)
    ours = [o for o in parsed if not o.key_or_group.startswith("hydra") and o.key_or_group not in groups]
    for override in ours:
        if any(len(part) > MAX_KEY_PART for part in override.key_or_group.split(".")):
            raise ConfigError(f"{override.input_line[:60]}...: a key part of over {MAX_KEY_PART} characters; "
                              "no setting has one")
        group, _, key = override.key_or_group.partition(".")
        if group in groups and key == "name":  # the rest of the group would stay the old choice's
            raise ConfigError(f"{override.input_line}: {group}.name names the chosen config; choose another "
                              f"with {group}={first_value(override)} (the choices: {', '.join(groups[group])})")
    plain = [o for o in ours if not (o.is_add() or o.is_force_add() or o.is_delete())]
    if plain:
        check_keys(plain, [o for o in parsed if o.key_or_group in groups])


def parse(text: str) -> Override:
    try:
        return OverridesParser.create().parse_overrides([text])[0]
    except HydraException:
        hint = ("an override is key=value, with no spaces around '=' (method=msr)" if "=" not in text else
                "sweep values are separated by commas, with no trailing one and no spaces (method=bn,msr)")
        raise ConfigError(f"{text!r} is not an override Hydra can read: {hint}") from None


def check_plugin(override: Override) -> None:
    module = PLUGINS.get((override.key_or_group, str(first_value(override))))
    if module is not None and importlib.util.find_spec(module) is None:
        raise ConfigError(f"{override.input_line} needs a Hydra plugin that is not installed ({module}); install it "
                          'with: pip install -e ".[launchers]"')


def check_sweep(argv: list[str]) -> None:
    """Check the config of every job of a ``-m`` sweep of value lists before the first
    one trains, and raise one ConfigError listing every job that would be refused (a
    search sweeper's jobs are sampled as it goes: each is checked at its start)."""
    args, _ = get_args_parser().parse_known_args(argv)
    parsed = [parse(text) for text in args.overrides]
    if not args.multirun or any(o.key_or_group in ("hydra/sweeper", "hparams_search") for o in parsed):
        return
    from .checks import validate_config  # torch: only for a sweep, once the overrides read well
    swept = {o.key_or_group for o in parsed if o.is_sweep_override()}
    jobs = [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]
    refused = []
    with initialize_config_module(CONFIG_MODULE, version_base="1.3"):
        for job in jobs:
            try:
                validate_config(compose("config", overrides=[o for o in job if not o.startswith("hydra")]))
            except (ConfigError, HydraException) as e:
                refused.append(f"{' '.join(o for o in job if o.split('=', 1)[0] in swept)}: {e}")
    if refused:
        raise ConfigError(f"{len(refused)} of the sweep's {len(jobs)} jobs would be refused, so none was started:\n  "
                          + "\n  ".join(refused))


def check_choices(override: Override, groups: dict[str, list[str]]) -> None:
    group, value = override.key_or_group, override.value()
    values = value.list if isinstance(value, ChoiceSweep) else value if isinstance(value, list) else [value]
    options = groups[group]
    for v in values:
        if isinstance(v, str) and v not in options:
            raise ConfigError(f"{group}={v}: there is no {group} {v!r}{did_you_mean(v, options)}; the choices are: "
                              f"{', '.join(options)}")


def check_keys(overrides: list[Override], group_overrides: list[Override]) -> None:
    """Each key must be a setting of the config these group choices compose."""
    chosen = [f"{o.key_or_group}={first_value(o)}" for o in group_overrides]
    try:
        with initialize_config_module(CONFIG_MODULE, version_base="1.3"):
            cfg = compose("config", overrides=chosen)
    except HydraException:  # Hydra says what is wrong with the choices themselves
        return
    nodes, leaves = flat_keys(OmegaConf.to_container(cfg, resolve=False))
    for override in overrides:
        key = override.key_or_group
        if key not in nodes and key not in leaves:
            raise ConfigError(f"{override.input_line}: there is no setting {key!r}"
                              f"{did_you_mean(key, nodes + leaves)}; `msr-train --cfg job` lists every setting")


def first_value(override: Override):
    value = override.value()
    return value.list[0] if isinstance(value, ChoiceSweep) else value


def flat_keys(node: dict, prefix: str = "") -> tuple[list[str], list[str]]:
    """The dotted keys of a nested config: (those of sections, those of settings)."""
    nodes, leaves = [], []
    for k, v in node.items():
        if isinstance(v, dict):
            inner = flat_keys(v, f"{prefix}{k}.")
            nodes += [prefix + str(k), *inner[0]]
            leaves += inner[1]
        else:
            leaves.append(prefix + str(k))
    return nodes, leaves


def did_you_mean(wrong: str, right: list[str]) -> str:
    """`` (did you mean ...?)`` for the closest of ``right``, by the whole name among names
    as deep (``methd`` -> ``method``) or by the last part (``lr`` -> ``optimizer.lr``): the
    best match and any nearly as close; '' if none is close."""
    def score(r: str) -> float:
        whole = difflib.SequenceMatcher(None, wrong, r).ratio() if r.count(".") == wrong.count(".") else 0.0
        return max(whole, difflib.SequenceMatcher(None, wrong.rsplit(".", 1)[-1], r.rsplit(".", 1)[-1]).ratio())
    scores = {r: score(r) for r in right}
    best = max(scores.values(), default=0.0)
    close = sorted((r for r, v in scores.items() if v >= max(0.6, best - 0.1)), key=lambda r: -scores[r])[:3]
    return f" (did you mean {' or '.join(close)}?)" if close else ""


def natural_order(name: str) -> list:
    """resnet8 before resnet18 before resnet110."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]
