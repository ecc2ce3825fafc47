"""What a run carries across a resumption: the loop's counters, the training window, the
random number generators, the model selected on validation, and the checkpoint a
resumed run continues from (with the settings it may and may not change)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from omegaconf import OmegaConf

from .checkpoint import (BEST, BEST_PREVIOUS, no_usable_checkpoint, read_checkpoint_file, readable_checkpoints,
                         write_checkpoint_file)
from .checks import RETIRED_SETTINGS, setting_rules
from .distributed import Context
from .errors import ConfigError, describe
from .rules import NOT_ADDED, shown
from .run_files import SUMMARY
from .run_log import flat_hparams, hparam_value
from .safe_files import remove_torn_writes

@dataclasses.dataclass
class LoopState:
    """The loop's counters, saved in every checkpoint. Times are seconds summed over
    resumptions."""

    step: int = 0
    best_val_acc: float | None = None
    best_val_step: int | None = None
    train_time: float = 0.0
    wall_time: float = 0.0

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for field in dataclasses.fields(self):
            setattr(self, field.name, state[field.name])


@dataclasses.dataclass(frozen=True)
class WindowReading:
    """The training window's sums over all ranks at one log point, and whether any rank
    was asked to stop: the ranks agree on every decision made from it."""

    loss: float
    correct: float
    n: int
    stop_requested: bool = False

    @property
    def mean_loss(self) -> float:
        return self.loss / max(self.n, 1)

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.n, 1)


class TrainingWindow:
    """Training loss and correct predictions since the last evaluation, summed on the
    device so that a step never waits for them. Reading them syncs with the device (and,
    with several processes, all-reduces), so the loop reads them once per log point and
    hands the reading on. ``n`` counts the examples of all processes. A checkpoint holds
    the global sums of the last reading: rank 0 carries them on, the others restart at 0."""

    def __init__(self, device: torch.device, is_main: bool):
        self.device, self.is_main = device, is_main
        self.load_state_dict({})

    def add(self, loss_sum: torch.Tensor, correct: torch.Tensor, n: int) -> None:
        self.loss += loss_sum
        self.correct += correct
        self.n += n

    def read(self, ctx: Context, stop_requested: bool) -> WindowReading:
        """The window's sums over all ranks (a collective: every rank calls it)."""
        flags = torch.stack([self.loss.double(), self.correct.double(),
                             torch.tensor(float(stop_requested), dtype=torch.float64, device=self.device)])
        loss, correct, stops = ctx.sum(flags).tolist()
        self.last = WindowReading(loss, correct, self.n, stops > 0)
        return self.last

    def interval_loss(self, reading: WindowReading) -> float | None:
        """The mean training loss since the previous call (or the window's start); None
        without new examples."""
        n = reading.n - self._interval_start.n
        mean = (reading.loss - self._interval_start.loss) / n if n else None
        self._interval_start = reading
        return mean

    def reset(self) -> None:
        self.load_state_dict({})

    def state_dict(self) -> dict:
        if self.last.n != self.n:
            raise RuntimeError("the training window is checkpointed at a log point only, after it was read")
        return {"loss": self.last.loss, "correct": self.last.correct, "n": self.last.n}

    def load_state_dict(self, state: dict) -> None:
        loss, correct, n = state.get("loss", 0.0), state.get("correct", 0.0), state.get("n", 0)
        self.loss = torch.tensor(loss if self.is_main else 0.0, device=self.device)
        self.correct = torch.tensor(correct if self.is_main else 0.0, device=self.device)
        self.n = n
        self.last = self._interval_start = WindowReading(loss, correct, n)


def window_state(checkpoint: dict) -> dict:
    """A checkpoint's training window (older checkpoints kept its sums in the loop state)."""
    if "window" in checkpoint:
        return checkpoint["window"]
    loop = checkpoint["loop"]
    return {"loss": loop["window_loss"], "correct": loop["window_correct"], "n": loop["window_n"]}


class BestModel:
    """The model selected on validation: the weights of the evaluation with the highest
    validation accuracy so far (the earliest on ties), kept in memory for the final test,
    in every checkpoint (``state_dict``), and, when ``path`` is set, in
    ``checkpoints/best.pt`` for msr-eval and ``load_run``. Because each checkpoint carries
    its own best model, a resumed run needs no other file: a damaged, missing or newer
    best.pt (a kill between writing it and last.pt) is rewritten from the checkpoint."""

    def __init__(self, path: Path | None, about: dict | None = None):
        #: Written into best.pt beside the weights: the run's config and its data's shape
        #: (``run_about``), so the file alone rebuilds and evaluates the model (msr-eval).
        self.path, self.about = path, about or {}
        self.state: dict | None = None
        self.step: int | None = None
        self.val_acc: float | None = None

    def update(self, model: torch.nn.Module, step: int, val_acc: float) -> None:
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.step, self.val_acc = step, val_acc
        self.write()

    def write(self) -> None:
        if self.path is not None:
            write_checkpoint_file(self.path, {**self.state_dict(), **self.about})

    def state_dict(self) -> dict | None:
        """What a checkpoint carries of it (None before the first validation)."""
        return None if self.state is None else {"model": self.state, "step": self.step, "val_acc": self.val_acc}

    def restore(self, folder: Path, saved: dict | None, step: int | None, device: torch.device) -> None:
        """Take the best model of a resumed run from its checkpoint (``saved``; for a
        checkpoint written before checkpoints carried it, from the best file that holds
        validation step ``step``), and make best.pt hold it. Raises ValueError if it is
        nowhere: the caller then tries the previous checkpoint."""
        if step is None:
            return
        if saved is None:
            saved = legacy_best(folder, step, device)
        if saved["step"] != step:
            raise ValueError(f"its best model is from step {saved['step']}, its loop state says {step}")
        self.state, self.step, self.val_acc = saved["model"], saved["step"], saved["val_acc"]
        if self.path is not None and saved_step(self.path) != step:
            self.write()


def saved_step(path: Path) -> int | None:
    """The validation step of the best model in ``path``; None if it is missing or unusable."""
    try:
        return read_checkpoint_file(path)["step"]
    except Exception:  # torch raises many types for a torn or foreign file
        return None


def legacy_best(folder: Path, step: int, device: torch.device) -> dict:
    """The best model of validation step ``step`` from best.pt or best_prev.pt, as older
    runs kept it (their checkpoints did not carry it)."""
    problems = []
    for path in (folder / BEST, folder / BEST_PREVIOUS):
        try:
            saved = read_checkpoint_file(path, map_location=device)
        except Exception as e:  # torch raises many types for a torn or foreign file
            problems.append(f"{path.name}: {describe(e)}")
            continue
        if saved["step"] == step:
            return saved
        problems.append(f"{path.name} holds step {saved['step']}")
    raise ValueError(f"its best model (validation step {step}) is in neither best file ({'; '.join(problems)})")


def run_about(cfg, info) -> dict:
    """What a checkpoint carries to be evaluated alone: the resolved config and the
    data's shape and normalisation (``data.DatasetInfo``)."""
    return {"config": OmegaConf.to_container(cfg, resolve=True),
            "data": {"name": info.name, "in_channels": info.in_channels, "image_size": info.image_size,
                     "num_classes": info.num_classes, "mean": list(cfg.dataset.mean), "std": list(cfg.dataset.std)}}


def rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def changed_settings(saved_cfg: dict, cfg) -> list[str]:
    """The settings of ``cfg`` that differ from a checkpoint's and may not change on
    resume, by each setting's rule (msr_train.rules: ``resumable``, ``added_later``,
    ``canonical``), each as ``key: before -> now``."""
    rules = setting_rules(cfg)
    saved, now = flat_hparams(OmegaConf.create(saved_cfg)), flat_hparams(cfg)
    added = {k: hparam_value(r.added_with) for k, r in rules.items() if r.added_with is not NOT_ADDED and k in now}
    saved = {**added, **saved}

    def value(values: dict, key: str):
        if key not in values:
            return NOT_SET
        return rules[key].canonical(values[key]) if key in rules else values[key]
    return [f"{k}: {_show(saved.get(k, NOT_SET))} -> {_show(now.get(k, NOT_SET))}"
            for k in sorted(saved.keys() | now.keys())
            if not (k in rules and rules[k].may_change_on_resume) and k not in RETIRED_SETTINGS
            and value(saved, k) != value(now, k)]


NOT_SET = object()


def _show(value) -> str:
    """A flat_hparams value (text as it is: null and lists are text there)."""
    if value is NOT_SET:
        return "(not set)"
    return value if isinstance(value, str) else shown(value)


def resumable_settings(cfg) -> list[str]:
    """The settings a resumed run may change, for the refusal's message."""
    return sorted(k for k, r in setting_rules(cfg).items() if r.may_change_on_resume)


def resumable_checkpoints(cfg, ckpt_dir: Path, tidy: bool = True):
    """Yield the checkpoints a run may continue from, newest first (last.pt, prev.pt),
    each read and verified, for the caller to apply; raise ConfigError if the folder holds
    a run with other settings, or checkpoints of which none is usable. ``tidy``: first
    remove the leftovers of a write that a kill interrupted (one process of a group does it)."""
    if tidy:
        remove_torn_writes(ckpt_dir)
    problems: list[str] = []
    for state, path in readable_checkpoints(ckpt_dir, problems, set_aside=tidy):
        if cfg.trainer.resume == "never":
            raise ConfigError(f"{ckpt_dir.parent} already holds a run ({path.name}); continue it with "
                              "trainer.resume=auto or choose another hydra.run.dir")
        changed = changed_settings(state["config"], cfg)
        if changed:
            raise ConfigError(f"{path} belongs to a run with other settings ({', '.join(changed[:5])}); re-run it "
                              "with its own settings to resume, or choose another hydra.run.dir. Only "
                              f"{', '.join(resumable_settings(cfg))} may change on resume")
        yield state, path, problems
    if problems:
        raise ConfigError(no_usable_checkpoint(ckpt_dir, problems))


#: Statuses of a run with nothing left to do, whatever its resumable settings say.
FINISHED = ("completed", "diverged")


def finished_summary(out_dir: Path, cfg) -> dict | None:
    """The summary of a run in ``out_dir`` that ended with these settings, or None. Its
    re-run (a finished sweep run again) has nothing to do: it must not test the model
    again nor log a second final point. A run that reached trainer.stop_at_val_acc is
    finished only while that target stays the same."""
    path = Path(out_dir) / SUMMARY
    if cfg.trainer.resume == "never" or not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):  # a damaged summary: the run's checkpoints decide
        return None
    if not isinstance(summary, dict) or not isinstance(summary.get("config"), dict):
        return None
    status, saved = summary.get("status"), summary["config"]
    same_target = saved.get("trainer", {}).get("stop_at_val_acc") == cfg.trainer.stop_at_val_acc
    if status in FINISHED or (status == "reached_target" and same_target):
        return None if changed_settings(saved, cfg) else summary
    return None
