#!/usr/bin/env python
"""Signal propagation plot of CIFAR ResNet-56 at initialisation, one line per method.

No training: each network is built for 3x32x32 inputs and 10 classes with its method's
defaults (conf/method/<name>.yaml), measured on a fixed unit-Gaussian batch
(msr_train.signal_prop) and drawn with msr-compare's plotting function. Two reference
variants join the methods:

- "nf, SkipInit off": NF's SkipInit gain starts at 0, which silences every residual
  branch at init, so the nf line shows the stem's statistics carried along; without it
  the plot shows what Scaled WS and the alpha/beta scaling do (the NF paper's plots).
- "none, He init": the unnormalised network with He et al.'s init (N(0, 2/fan_in), zero
  bias) instead of PyTorch's default, the unnormalised ResNet of the NF paper.

    python scripts/signal_prop_init.py --out docs/img/signal_prop_resnet56_init.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn

from msr_train.compare import DPI, signal_prop_figure
from msr_train.methods import build_method
from msr_train.models import build_model
from msr_train.signal_prop import gaussian_batch, signal_propagation

CONF = Path(__file__).resolve().parents[1] / "conf" / "method"
#: label -> (method, overrides of its config, He re-init)
VARIANTS = {
    "none": ("none", {}, False),
    "none, He init": ("none", {}, True),
    "bn": ("bn", {}, False),
    "msr": ("msr", {}, False),
    "nf": ("nf", {}, False),
    "nf, SkipInit off": ("nf", {"skipinit": False}, False),
}


def he_init_(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def build(method: str, overrides: dict, he_init: bool, model: str, seed: int) -> nn.Module:
    cfg = OmegaConf.merge(OmegaConf.load(CONF / f"{method}.yaml"), overrides)
    torch.manual_seed(seed)
    net = build_model(model, build_method(cfg), in_channels=3, num_classes=10, image_size=32)
    if he_init:
        he_init_(net)
    return net


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet56")
    p.add_argument("--batch-size", type=int, default=64, help="of the Gaussian input batch")
    p.add_argument("--seed", type=int, default=0, help="of the weights and of the input")
    p.add_argument("--out", type=Path, default=Path("docs/img/signal_prop_resnet56_init.png"))
    args = p.parse_args()

    x = gaussian_batch((3, 32, 32), args.batch_size, args.seed)
    series = []
    print(f"{'':18}{'avg_sq_mean at block:':>34}{'avg_var at block:':>34}")
    for label, (method, overrides, he_init) in VARIANTS.items():
        records = signal_propagation(build(method, overrides, he_init, args.model, args.seed), x)
        series.append((label, records))
        picks = (records[0], records[len(records) // 2], records[-1])
        if not series[1:]:
            print(f"{'':18}" + "".join(f"{r['block']:>11}" for r in picks) * 2)
        print(f"{label:18}" + "".join(f"{r[stat]:>11.3g}" for stat in ("avg_sq_mean", "avg_var") for r in picks))
    fig = signal_prop_figure(series, title=f"{args.model} at init, unit Gaussian input "
                                           f"(batch {args.batch_size}, 3x32x32)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=DPI)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
