"""Optuna searches that resume (``hparams_search=lr_optuna``).

hydra-optuna-sweeper keeps its study in memory unless ``hydra.sweeper.storage`` names a
database, and runs ``n_trials`` more trials each time it starts. This sweeper rebuilds
the study from the sweep dir instead, whose trial run dirs are the record of the search
(each holds its overrides in ``.hydra/overrides.yaml`` and its outcome in
``summary.json``), and counts ``n_trials`` over the whole study, so re-running the same
command into the same ``hydra.sweep.dir`` continues the search:

- finished trials (completed, diverged: scored as msr_train.sweeps.objective scores
  them) are added back to the study, told to the sampler, and not run again; a re-run
  tops the study up to ``n_trials`` (nothing to do once it holds them);
- a trial whose run dir has no finished summary (its sweep was killed) is queued first
  with its parameters, so its run dir (the default ``hydra.sweep.subdir`` names it by its
  overrides) resumes from its checkpoint;
- job numbers continue after the trials found;
- the sampler's random state is not stored, so a continued search reseeds it at random:
  it is not the search an uninterrupted sweep would have made, only one as good.

Why not Optuna's own SQLite storage: hydra-optuna-sweeper 1.3 pins Optuna 2.x, whose
database storage does not work with SQLAlchemy 2 (which MLflow and current Alembic
need). A ``hydra.sweeper.storage`` the user sets is used as the plugin uses it, and
then this rebuilding is off.

Installed as ``hydra_plugins.msr_train.search`` (pyproject.toml's package-dir): Hydra
accepts sweepers only from the ``hydra_plugins`` namespace and imports every module
there at each start, so this one imports Optuna only when a search runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List

import yaml

from msr_train.run_files import SUMMARY
from msr_train.sweeps import objective

try:
    from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper
except ImportError:  # without the [launchers] extra: lr_optuna says what to install
    OptunaSweeper = None

DONE = ("completed", "diverged")


def trials_in(sweep_dir: Path, searched: list[str]) -> tuple[list[tuple[dict, float]], list[dict]]:
    """The sweep dir's trials: (params, objective) of the finished ones, and the params of
    the unfinished ones. ``searched``: the searched keys (``optimizer.lr``)."""
    finished, unfinished = [], []
    for overrides_file in sorted(sweep_dir.glob("*/.hydra/overrides.yaml")):
        run_dir = overrides_file.parent.parent
        given = dict(o.split("=", 1) for o in yaml.safe_load(overrides_file.read_text()) or [] if "=" in o)
        if not all(k in given for k in searched):
            continue  # not a trial of this search
        params = {k: yaml.safe_load(given[k]) for k in searched}
        try:
            summary = json.loads((run_dir / SUMMARY).read_text())
        except (OSError, ValueError):
            summary = {}
        if summary.get("status") in DONE:
            finished.append((params, objective(summary)))
        else:
            unfinished.append(params)
    return finished, unfinished


def rebuilt_study(impl, sweep_dir: Path):
    """An in-memory study holding the sweep dir's trials, for ``impl`` to continue;
    returns (storage, finished trials, trials found)."""
    import optuna
    from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides
    impl._process_searchspace_config()
    distributions, _ = create_params_from_overrides(impl._parse_sweeper_params_config())
    finished, unfinished = trials_in(sweep_dir, list(distributions))
    storage = optuna.storages.InMemoryStorage()
    study = optuna.create_study(study_name=impl.study_name, storage=storage, directions=impl._get_directions())
    for params, value in finished:
        study.add_trial(optuna.trial.create_trial(params=params, distributions=distributions, value=value))
    for params in unfinished:
        study.enqueue_trial(params)
    return storage, len(finished), len(finished) + len(unfinished)


if OptunaSweeper is not None:
    class ResumableOptunaSweeper(OptunaSweeper):
        """hydra-optuna-sweeper's sweeper, continuing the search its sweep dir holds."""

        def sweep(self, arguments: List[str]) -> None:
            impl = self.sweeper
            if impl.storage is None:
                sweep_dir = Path(impl.config.hydra.sweep.dir)
                impl.storage, finished, found = rebuilt_study(impl, sweep_dir)
                impl.n_trials = max(impl.n_trials - finished, 0)
                impl.job_idx = found
                if found and hasattr(impl.sampler, "reseed_rng"):  # a grid is not random
                    # The sampler's random state is not stored: seeded as at the start it
                    # would propose the first trials' parameters again.
                    impl.sampler.reseed_rng()
            return super().sweep(arguments)
