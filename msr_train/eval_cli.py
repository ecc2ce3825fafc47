"""`msr-eval`: evaluate a trained run's checkpoint without training.

    msr-eval outputs/runs/fashion_mnist/resnet20-msr-bs128-seed0/2026-12-02_10-00-00
    msr-eval RUN_DIR --checkpoint last --split val --batch-size 100
    msr-eval best.pt dataset.root=$HOME/data                 # a checkpoint file alone
    msr-eval RUN_DIR method.eval_statistics=example          # BN with per-example statistics

Writes ``eval_<checkpoint>_<split>[_<overrides>].json`` beside the run (the run folder of
``checkpoints/<name>.pt``, else the checkpoint file's folder) and touches no other file:
``<split>_acc``, ``<split>_loss`` (top-5 with more than 10 classes), the checkpoint's step,
the overrides and the command. The data, its split and the evaluation batch size are the
run's own unless overridden, so ``best`` on the test split reproduces the run's
``selected_test_acc``. Bad input (no checkpoint, a corrupt one, a wrong override) is one
line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import itertools
import re
import shlex
import sys
import time
from pathlib import Path

import torch
import yaml

from .safe_files import write_json
from .data import build_data
from .errors import ConfigError
from .distributed import Context
from .load import checkpoint_path, restore
from .methods.base import FINALIZED
from .run_files import CHECKPOINTS
from .precision import Precision
from .train import evaluate

#: Settings an evaluation may change: where the data is and how the model is evaluated.
EVAL_OVERRIDES = ("dataset.root", "dataset.download", "dataset.num_workers", "method.eval_statistics",
                  "method.precise_bn_batches", "trainer.precision")


def parse_overrides(items: list[str]) -> dict:
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in EVAL_OVERRIDES:
            raise ConfigError(f"{item!r}: msr-eval takes key=value for one of {', '.join(EVAL_OVERRIDES)} (the "
                              "weights and the data split stay the run's)")
        overrides[key] = yaml.safe_load(value) if value else None  # typed as YAML, as Hydra types an override
    return overrides


def out_file(ckpt: Path, split: str, overrides: dict) -> Path:
    folder = ckpt.parent.parent if ckpt.parent.name == CHECKPOINTS else ckpt.parent
    tag = "".join(f"_{re.sub(r'[^A-Za-z0-9.=-]+', '_', f'{k}={v}')}" for k, v in overrides.items()
                  if not k.startswith("dataset."))
    return folder / f"eval_{ckpt.stem}_{split}{tag}.json"


def training_batches(data, cfg, count: int):
    """The first epoch's first ``count`` micro-batches, as training saw them."""
    micro = (x.chunk(cfg.trainer.accumulate) for x, _ in data.train.replay(0))
    return itertools.islice((x for chunks in micro for x in chunks), count)


def run_eval(args) -> Path:
    overrides = parse_overrides(args.overrides)
    ckpt = checkpoint_path(args.path, args.checkpoint)
    device = torch.device(args.device)
    model, cfg, state = restore(ckpt, device, overrides)
    data = build_data(cfg.dataset, batch_size=cfg.batch_size, eval_batch_size=args.batch_size or
                      cfg.trainer.eval_batch_size, seed=cfg.seed, device=device)
    batches = data.test if args.split == "test" else data.val
    if batches is None:
        raise ConfigError(f"the run has no validation split (dataset.val_size={cfg.dataset.val_size}); use --split test")
    started = time.perf_counter()
    # What the loop does before an evaluation (precise BN), on the first epoch's batches.
    getattr(model, FINALIZED).before_evaluation(model, lambda n: training_batches(data, cfg, n), Context())
    metrics = evaluate(model, batches, data.info.num_classes, precision=Precision(cfg.trainer.precision, device),
                       split=args.split)
    step = state.get("step")
    result = {**metrics, "checkpoint": str(ckpt), "step": step, "split": args.split,
              "images": data.info.test_size if args.split == "test" else data.info.val_size,
              "overrides": overrides, "device": str(device), "time_s": time.perf_counter() - started,
              "command": args.command}
    path = out_file(ckpt, args.split, overrides)
    write_json(path, result)
    print(f"{args.split} acc {100 * metrics[f'{args.split}_acc']:.2f}%, loss {metrics[f'{args.split}_loss']:.4f} "
          f"({result['images']:,} images, {ckpt.name} at step {step}); wrote {path}")
    return path


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="msr-eval", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n")[1])
    p.add_argument("path", type=Path, metavar="RUN_DIR_OR_CHECKPOINT")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=f"one of {', '.join(EVAL_OVERRIDES)}")
    p.add_argument("--checkpoint", choices=("best", "last"), default="best",
                   help="in a run folder: best (selected on validation, default) or last")
    p.add_argument("--split", choices=("test", "val"), default="test")
    p.add_argument("--batch-size", type=int, metavar="N", help="evaluation batch (default: the run's)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, cuda:1")
    args = p.parse_intermixed_args(argv)  # options before or after the overrides
    args.command = shlex.join(["msr-eval", *(sys.argv[1:] if argv is None else argv)])
    if args.batch_size is not None and args.batch_size < 1:
        p.error(f"--batch-size {args.batch_size}: a number of images >= 1")
    try:
        run_eval(args)
    except ConfigError as e:
        print(f"msr-eval: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
