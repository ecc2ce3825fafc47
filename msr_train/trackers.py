"""Experiment trackers beside TensorBoard (the ``logger`` config group): MLflow and
Weights & Biases.

Each tracker gets exactly what RunLog writes (a record of metrics.jsonl, a scalar of the
log points, the summary), so the trackers hold the same numbers as the run dir. The
step of every point is the run's optimizer step.

A tracker is never worth a lost run: an error from it (a server that goes away, a full
store) is one warning, and the tracker is switched off for the rest of the run while
training goes on. The tracker's run id is kept in ``<run dir>/trackers.json``, so a
resumed run continues the same tracker run; the points that the interrupted run logged
beyond its last checkpoint are not logged again (the resumed run recomputes them bit for
bit, so the stored ones are already right).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from pathlib import Path

from .errors import ConfigError
from .safe_files import write_json

#: Where each tracker's run id is kept, beside metrics.jsonl.
IDS_FILE = "trackers.json"
#: A metrics.jsonl record's keys that are its coordinates, not metrics.
NOT_METRICS = ("step", "epoch", "examples_seen")
#: summary.json's status -> MLflow's run status.
MLFLOW_STATUS = {"completed": "FINISHED", "interrupted": "KILLED"}


def check_installed(loggers) -> None:
    """A clear error, before any work, for a selected logger whose package is missing."""
    for name in loggers:
        cls = TRACKERS.get(name)
        if cls is not None and importlib.util.find_spec(cls.package) is None:
            raise ConfigError(f'logger={name} needs {cls.package}: pip install -e ".[{cls.package}]" '
                              f'(or pip install {cls.package}); or choose another logger (tensorboard, none)')


def _numeric(values: dict) -> dict[str, float]:
    return {k: float(v) for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in NOT_METRICS}


def load_ids(out_dir: Path) -> dict:
    try:
        return json.loads((out_dir / IDS_FILE).read_text())
    except (OSError, ValueError):
        return {}


def save_id(out_dir: Path, name: str, run_id: str) -> None:
    write_json(out_dir / IDS_FILE, {**load_ids(out_dir), name: run_id})


class Tracker:
    """The calls RunLog makes; a failing call warns once and switches the tracker off."""
    name = "tracker"
    package = ""  # the module it needs, also the name of its pyproject extra

    def __init__(self):
        self.alive = True

    def _guard(self, what: str, fn, *args) -> None:
        if not self.alive:
            return
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001 - any tracker failure: warn, keep training
            self.alive = False
            print(f"msr-train: warning: logger {self.name}: {what} failed ({type(e).__name__}: {e}); the run goes "
                  f"on without {self.name} (metrics.jsonl has every point)", file=sys.stderr, flush=True)

    def log(self, metrics: dict, step: int) -> None:
        self._guard("logging", self._log, _numeric(metrics), step)

    def close(self, summary: dict) -> None:
        self._guard("closing", self._close, summary)


def mlflow_uri(settings) -> str:
    """``logger.mlflow.tracking_uri``, or the default store: outputs/mlflow.db (SQLite)
    under the directory msr-train was started in."""
    return settings.get("tracking_uri") or f"sqlite:///{Path('outputs').resolve() / 'mlflow.db'}"


class MLflowTracker(Tracker):
    """One MLflow run per msr-train run: the flat config as params, every metric at the
    run's step, the summary's figures as metrics and its status as a tag and the run's
    status. ``tracking_uri`` null: a local SQLite store, ``outputs/mlflow.db`` under the
    directory msr-train was started in (``mlflow ui --backend-store-uri sqlite:///outputs/mlflow.db``)."""
    name = "mlflow"
    package = "mlflow"

    def __init__(self, settings, cfg, out_dir: Path, params: dict, resume_step: int | None, experiment: str):
        super().__init__()
        check_installed([self.name])
        from mlflow.tracking import MlflowClient
        # A server that went away should cost seconds, not MLflow's default minutes of retries.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        self.out_dir, self.logged = out_dir, {}
        uri = mlflow_uri(settings)
        if uri.startswith("sqlite:///"):
            Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(tracking_uri=uri)
        self._guard("starting", self._start, settings.experiment or experiment, params, resume_step)

    def _start(self, experiment: str, params: dict, resume_step: int | None) -> None:
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
        run_id = load_ids(self.out_dir).get(self.name) if resume_step is not None else None
        if run_id is not None:
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")
            # What the interrupted run logged: those points are not logged again.
            for key in self.client.get_run(run_id).data.metrics:
                self.logged[key] = max(m.step for m in self.client.get_metric_history(run_id, key))
            return
        self.run_id = self.client.create_run(experiment_id, run_name=self.out_dir.name,
                                             tags={"msr_train.run_dir": str(self.out_dir.resolve())}).info.run_id
        save_id(self.out_dir, self.name, self.run_id)
        from mlflow.entities import Param
        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params a batch
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def _log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        fresh = [Metric(k, v, now, step) for k, v in metrics.items() if step > self.logged.get(k, -1)]
        if fresh:
            self.client.log_batch(self.run_id, metrics=fresh)

    def _close(self, summary: dict) -> None:
        self._log({f"summary/{k}": v for k, v in _numeric(summary).items()}, summary.get("step", 0))
        self.client.set_tag(self.run_id, "status", summary.get("status", "unknown"))
        self.client.set_terminated(self.run_id, status=MLFLOW_STATUS.get(summary.get("status"), "FAILED"))


def wandb_mode(settings) -> str:
    """``logger.wandb.mode``, else the environment's (``WANDB_MODE``; online with a
    ``WANDB_API_KEY``), else offline: nothing leaves the machine unless W&B is set up."""
    return settings.get("mode") or os.environ.get("WANDB_MODE") or (
        "online" if os.environ.get("WANDB_API_KEY") else "offline")


class WandbTracker(Tracker):
    """One W&B run per msr-train run: the flat config, every metric at the run's step, the
    summary's figures (``summary/*``) and status in the run's summary. ``mode`` null:
    offline (files under ``<run dir>/wandb``; ``wandb sync`` uploads them later) unless
    the environment chooses (``WANDB_MODE``, or ``WANDB_API_KEY`` for online): nothing
    leaves the machine unless the user has set W&B up. A resumed run continues the same
    W&B run id; the last step logged is kept in trackers.json, because an offline run
    cannot ask a server what the interrupted run logged. W&B writes its points from a
    buffer in a process of its own: a run stopped by a signal (Ctrl-C, SIGTERM) finishes
    them, but a SIGKILL can lose the last points W&B had not written (metrics.jsonl has
    them; the resumed run does not log them again)."""
    name = "wandb"
    package = "wandb"

    def __init__(self, settings, cfg, out_dir: Path, params: dict, resume_step: int | None, experiment: str):
        super().__init__()
        check_installed([self.name])
        import wandb
        self.out_dir = out_dir
        ids = load_ids(out_dir) if resume_step is not None else {}
        # Steps up to the interrupted run's last are not logged again (at that step it may
        # have logged part of the points: none is logged twice, at worst one is missing).
        self.skip_until = self.last = ids.get("wandb_step", -1)
        self._guard("starting", self._start, wandb, settings, settings.project or experiment, params,
                    ids.get(self.name), wandb_mode(settings))

    def _start(self, wandb, settings, project: str, params: dict, run_id: str | None, mode: str) -> None:
        self.run = wandb.init(project=project, entity=settings.entity, name=self.out_dir.name,
                              id=run_id, resume="allow", config=params,
                              dir=str(self.out_dir), mode=mode, reinit="finish_previous",
                              settings=wandb.Settings(console="off", silent=True))
        save_id(self.out_dir, self.name, self.run.id)

    def _log(self, metrics: dict[str, float], step: int) -> None:
        if step <= self.skip_until:
            return
        self.run.log(metrics, step=step)
        if step > self.last:
            self.last = step
            write_json(self.out_dir / IDS_FILE, {**load_ids(self.out_dir), "wandb_step": step})

    def _close(self, summary: dict) -> None:
        self.run.summary.update({f"summary/{k}": v for k, v in _numeric(summary).items()})
        self.run.summary["status"] = summary.get("status", "unknown")
        self.run.finish(exit_code=0 if summary.get("status") == "completed" else 1)


TRACKERS = {"mlflow": MLflowTracker, "wandb": WandbTracker}
