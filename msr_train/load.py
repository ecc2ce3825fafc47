"""A trained model back from a run folder or a checkpoint file: ``load_run``.

A checkpoint (best.pt or last.pt) carries the weights, the resolved config and the data's
shape and normalisation, so the file alone rebuilds the model: the architecture and the
method come from the config through ``build_model``, which also sets what is not in the
state dict (NF's folded input scales). Checkpoints of older runs lack the config in
best.pt; it is then read from the run's summary.json or last.pt beside it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from . import run_files
from .checkpoint import BEST, LAST, read_checkpoint_file
from .data import build_data
from .errors import ConfigError, describe
from .methods import build_method
from .models import build_model

CHECKPOINTS = {"best": BEST, "last": LAST}


def checkpoint_path(path: Path, checkpoint: str) -> Path:
    """The checkpoint file: ``path`` itself, or ``checkpoints/<checkpoint>.pt`` in a run folder."""
    path = Path(path)
    if path.is_file():
        return path
    if checkpoint not in CHECKPOINTS:
        raise ConfigError(f"checkpoint {checkpoint!r} is not one of: {', '.join(CHECKPOINTS)}")
    found = path / run_files.CHECKPOINTS / CHECKPOINTS[checkpoint]
    if not found.is_file():
        what = "no such file or folder" if not path.exists() else f"it has no {found.relative_to(path)}"
        hint = " (a run without a validation split keeps no best.pt: use last)" if checkpoint == "best" else ""
        raise ConfigError(f"{path}: {what}{hint}; pass a run folder (one holding checkpoints/"
                          f"{CHECKPOINTS[checkpoint]}) or a checkpoint file")
    return found


def read(path: Path, device="cpu") -> dict:
    try:
        return read_checkpoint_file(path, map_location=device)
    except Exception as e:  # torch raises many types for a torn or foreign file
        raise ConfigError(f"{path} is not a usable checkpoint ({describe(e)})") from None


def run_config(state: dict, ckpt: Path) -> DictConfig:
    """The run's config: the checkpoint's own, else the run folder's (older best.pt files)."""
    if "config" in state:
        return OmegaConf.create(state["config"])
    run_dir = ckpt.parent.parent
    summary = run_dir / run_files.SUMMARY
    if summary.is_file():
        config = json.loads(summary.read_text()).get("config")
        if config:
            return OmegaConf.create(config)
    if (ckpt.parent / LAST).is_file():
        return OmegaConf.create(read(ckpt.parent / LAST)["config"])
    raise ConfigError(f"{ckpt} carries no config (written before checkpoints did) and its run folder has neither "
                      "summary.json nor checkpoints/last.pt to read one from")


def weights(state: dict) -> dict:
    """The weights the run evaluated: with an EMA (trainer.ema_decay) last.pt's average."""
    return state["ema"] if "ema" in state else state["model"]


def load_run(path, checkpoint: str = "best", device="cpu", overrides: dict | None = None):
    """``(model, cfg)``: the model of a run folder's ``checkpoint`` (best: the one selected
    on validation; last: the newest) or of a checkpoint file, on ``device`` in eval mode,
    and the run's config. ``overrides`` ({"method.eval_statistics": "example"}) change the
    config before the model is built (how it is evaluated, never its weights)."""
    model, cfg, _ = restore(checkpoint_path(Path(path), checkpoint), device, overrides)
    return model, cfg


def restore(ckpt: Path, device="cpu", overrides: dict | None = None):
    """``load_run``'s work on one checkpoint file, also returning the file's contents."""
    state = read(ckpt, device)
    cfg = run_config(state, ckpt)
    for key, value in (overrides or {}).items():
        OmegaConf.update(cfg, key, value, merge=False)
    data = state.get("data") or data_shape(cfg)
    method = build_method(cfg.method, cfg.batch_size)
    model = build_model(cfg.model.name, method, in_channels=data["in_channels"], num_classes=data["num_classes"],
                        image_size=data["image_size"], small_input=cfg.model.get("small_input", "auto"))
    try:
        model.load_state_dict(weights(state))
    except RuntimeError as e:
        raise ConfigError(f"{ckpt}: its weights do not fit the model its config builds ({describe(e)})") from None
    return model.to(device).eval(), cfg, state


def data_shape(cfg) -> dict:
    """The data's shape for a checkpoint without it: read off the dataset itself."""
    info = build_data(cfg.dataset, batch_size=1, eval_batch_size=1, seed=0, device=torch.device("cpu")).info
    return {"in_channels": info.in_channels, "image_size": info.image_size, "num_classes": info.num_classes}
