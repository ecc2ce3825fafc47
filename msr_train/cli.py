"""`msr-train`: the Hydra entry point. Configs live in conf/ (shipped as msr_train.conf)."""

from __future__ import annotations

import os
import shlex
import sys
import tempfile
from contextlib import nullcontext
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

from .errors import ConfigError, RunFailed
from .launch import stage, staged_subdir, withdraw
from .overrides import check_command_line, check_sweep
from .sweeps import announce_keys, objective, sweep_job, sweep_subdir

#: Exit codes of a single run that did not complete (a sweep goes on to its other jobs).
EXIT_CODES = {"diverged": 1, "interrupted": 130}


def varying_keys(hydra_cfg) -> list[str]:
    """The keys a multirun sweeps: command-line overrides with several values (a,b or
    range(...)) and the parameters of a search sweeper (Optuna's hydra.sweeper.params)."""
    overrides = OverridesParser.create().parse_overrides(list(hydra_cfg.overrides.task))
    keys = [o.key_or_group for o in overrides if o.is_sweep_override()]
    return keys + [k for k in (hydra_cfg.sweeper.get("params") or {}) if k not in keys]


OmegaConf.register_new_resolver("msr_sweep_subdir", sweep_subdir, replace=True)
OmegaConf.register_new_resolver("msr_launch_subdir", staged_subdir, replace=True)


class OutputDirCheck(Callback):
    """Hydra creates the run (or sweep) dir before msr-train starts, and a dir it cannot
    create ends in its traceback: check it first (conf/config.yaml registers this)."""

    def on_run_start(self, config, **kwargs) -> None:
        self.check(config.hydra.run.dir, "hydra.run.dir")

    def on_multirun_start(self, config, **kwargs) -> None:
        self.check(config.hydra.sweep.dir, "hydra.sweep.dir")
        announce_keys(varying_keys(config.hydra))

    @staticmethod
    def check(folder: str, key: str) -> None:
        """The folder exists and takes files (a read-only one would crash Hydra's logging)."""
        if not str(folder).strip():
            print(f"msr-train: error: {key} is empty, which would write the run into the current directory; "
                  f"leave {key} out (a new folder under outputs/) or name a folder", file=sys.stderr)
            sys.exit(2)
        try:
            Path(folder).mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError as e:
            print(f"msr-train: error: the output dir {folder} cannot be created or written to ({e.strerror}); "
                  f"set {key} to a folder you can write to", file=sys.stderr)
            sys.exit(2)


def check_objective(cfg, hydra_cfg) -> None:
    """A search (a sweeper that reads the objective, e.g. Optuna) scores runs by their
    validation accuracy, so it needs a validation split."""
    searching = "BasicSweeper" not in str(hydra_cfg.sweeper.get("_target_", "BasicSweeper"))
    if searching and cfg.dataset.val_size == 0:
        raise ConfigError(f"{hydra_cfg.sweeper._target_} scores runs by validation accuracy, but dataset.val_size=0; "
                          "keep a validation split (e.g. dataset.val_size=5000)")


def continue_command(hydra_cfg) -> str:
    """The command that continues this run: its overrides, pinned to its own output dir
    (re-running the original command would start afresh in a new timestamped dir)."""
    overrides = [o for o in hydra_cfg.overrides.task if not o.startswith("hydra.run.dir=")]
    return shlex.join(["msr-train", *overrides, f"hydra.run.dir={hydra_cfg.runtime.output_dir}"])


def share_cpu_threads(cfg, hydra_cfg) -> None:
    """Jobs of a local parallel sweep (joblib's ``n_jobs``) split the cores between them
    when ``trainer.cpu_threads`` is null: two 2-thread runs on 2 cores spin-wait on each
    other and train 3-25x slower than two 1-thread runs (docs/benchmarks.md, "CPU
    threads"). The share is written into the run's config, which records it."""
    n_jobs = hydra_cfg.launcher.get("n_jobs") if hydra_cfg.mode.name == "MULTIRUN" else None
    if cfg.trainer.cpu_threads is not None or not isinstance(n_jobs, int) or n_jobs == 1:
        return
    cores = os.cpu_count() or 1
    jobs = n_jobs if n_jobs > 0 else max(1, cores + 1 + n_jobs)  # joblib: -1 all cores, -2 all but one
    cfg.trainer.cpu_threads = max(1, cores // jobs)


@hydra.main(version_base="1.3", config_path="pkg://msr_train.conf", config_name="config")
def _run(cfg) -> float | None:
    hydra_cfg = HydraConfig.get()
    out_dir = Path(hydra_cfg.runtime.output_dir)
    stage(hydra_cfg.runtime.output_dir, hydra_cfg.output_subdir)
    try:
        return run_job(cfg, hydra_cfg, out_dir)
    finally:  # a refused or stopped launch leaves nothing behind (msr_train.launch)
        withdraw(out_dir, f"{hydra_cfg.job.name}.log")


def run_job(cfg, hydra_cfg, out_dir: Path) -> float | None:
    from .train import train  # torch is imported only once Hydra has parsed the command line
    sweep = hydra_cfg.mode.name == "MULTIRUN"
    try:
        check_objective(cfg, hydra_cfg)
        share_cpu_threads(cfg, hydra_cfg)
        with sweep_job() if sweep else nullcontext():
            summary = train(cfg, out_dir, job_num=hydra_cfg.job.num if sweep else None)
    except (ConfigError, RunFailed) as e:
        print(f"msr-train: error: {e}", file=sys.stderr)
        if sweep:
            raise  # Hydra records the job as failed; the sweep's other jobs still run
        if isinstance(e, RunFailed):
            print(f"msr-train: continue with: {continue_command(hydra_cfg)}", file=sys.stderr)
        sys.exit(2 if isinstance(e, ConfigError) else 1)
    if not sweep and summary["status"] in EXIT_CODES:
        if summary["status"] == "interrupted":
            print(f"msr-train: continue with: {continue_command(hydra_cfg)}", file=sys.stderr)
        sys.exit(EXIT_CODES[summary["status"]])
    return objective(summary)  # to Hydra's sweepers (Optuna)


def register_search_sweeper() -> None:
    """Hydra finds its plugins by walking the hydra_plugins namespace's folders, which an
    editable install's mapped package (hydra_plugins.msr_train, pyproject.toml) is not
    in: register the resumable Optuna sweeper by its installed name where the walk
    missed it (a regular install is found by the walk)."""
    from hydra.core.plugins import Plugins
    from hydra_plugins.msr_train import search
    if search.OptunaSweeper is not None:
        name = f"{search.__name__}.{search.ResumableOptunaSweeper.__name__}"
        Plugins.instance().class_name_to_class.setdefault(name, search.ResumableOptunaSweeper)


def main() -> None:
    try:
        check_command_line(sys.argv[1:])
        check_sweep(sys.argv[1:])
    except ConfigError as e:
        print(f"msr-train: error: {e}", file=sys.stderr)
        sys.exit(2)
    register_search_sweeper()
    _run()


if __name__ == "__main__":
    from .entry import msr_train
    msr_train()
