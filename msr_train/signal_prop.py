"""Signal propagation: how the activations' statistics evolve with depth.

Signal Propagation Plots (Brock, De, Smith, "Characterizing signal propagation to close
the performance gap in unnormalized ResNets", ICLR 2021, arXiv 2101.08692, section 3;
docs/methods.md "nf", item 5) feed a fixed unit-Gaussian batch through the network and record,
after the stem and after every residual block:

- ``avg_sq_mean``: the squared mean of each channel (over batch and positions), averaged
  over channels. It grows with depth in unnormalised ReLU ResNets with He-type init: the
  mean shift that BatchNorm removes, and that MSR's zero-mean kernels and NF's Scaled
  Weight Standardization prevent.
- ``avg_var``: the variance of each channel (over batch and positions), averaged over
  channels.
- ``branch_var``: the same average channel variance of the residual branch's output
  (``ResidualBlock.branch``, before the join scales or adds it; for nf that is before
  SkipInit's gain and alpha too, which live in its join).

VGG has no residual blocks: there the record is taken after every conv-norm-activation
unit, and ``branch_var`` is None.

Measurement mode: every module in eval mode (no MSR noise, no dropped branches, no
dropout), except BatchNorm layers, which normalise with the batch's own statistics as
in training (the NF paper's plots of BN networks) without updating their running
statistics. With running statistics a BN network at init would be the unnormalised
network. The model's modes are restored afterwards, and the input is drawn from its own
generator, so measuring does not change what training does next.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

from .models.resnet import ResidualBlock
from .run_files import SIGNAL_PROP
from .safe_files import append_jsonl

#: Where ``record_signal_prop`` writes inside a run folder.
FILENAME = SIGNAL_PROP
#: The statistics of a record, each also logged to TensorBoard.
STATS = ("avg_sq_mean", "avg_var", "branch_var")
_POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


def channel_stats(x: torch.Tensor) -> tuple[float, float]:
    """(squared channel mean averaged over channels, channel variance averaged over
    channels), with mean and variance taken over the batch and all positions."""
    dims = (0, *range(2, x.dim()))
    var, mean = torch.var_mean(x.float(), dim=dims, correction=0)
    return float(mean.square().mean()), float(var.mean())


def gaussian_batch(input_shape, batch_size: int = 64, seed: int = 0, device="cpu",
                   dtype=torch.float32) -> torch.Tensor:
    """The fixed unit-Gaussian input, of shape (batch_size, *input_shape). Drawn from its
    own generator: the global random state, hence training, is left untouched."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn((batch_size, *input_shape), generator=g).to(device=device, dtype=dtype)


@contextlib.contextmanager
def _measuring(model: nn.Module):
    """no_grad, eval mode except BatchNorm (batch statistics, running ones untouched);
    restores every module's own mode on exit."""
    modes = [(m, m.training) for m in model.modules()]
    norms = [(m, m.track_running_stats) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    model.eval()
    for m, _ in norms:
        # Training mode without tracking: batch statistics, and no running-stat update.
        m.training, m.track_running_stats = True, False
    try:
        with torch.no_grad():
            yield
    finally:
        for m, training in modes:
            m.training = training
        for m, tracking in norms:
            m.track_running_stats = tracking


def _forward(model: nn.Module, x: torch.Tensor, handles) -> None:
    """One measuring forward pass; the hooks' ``handles`` are removed afterwards."""
    try:
        with _measuring(model):
            model(x)
    finally:
        for h in handles:
            h.remove()


def _conv_units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """For networks without residual blocks (VGG): (name, module) of the last module of
    every conv unit, i.e. a conv and what follows it in its Sequential up to the next conv
    or pooling layer."""
    units = []
    for prefix, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        last = None
        for name, child in seq.named_children():
            if isinstance(child, (nn.Conv2d, *_POOLS)) and last is not None:
                units.append(last)
                last = None
            if isinstance(child, nn.Conv2d) or last is not None:
                last = (f"{prefix}.{name}" if prefix else name, child)
        if last is not None:
            units.append(last)
    return units


def signal_propagation(model: nn.Module, x: torch.Tensor) -> list[dict]:
    """One record per measuring point, in forward order::

        {"block": 0, "name": "stem", "depth": 1, "avg_sq_mean": ..., "avg_var": ..., "branch_var": None}

    - ``block``: 0 is the stem's output (the first residual block's input), i the output of
      the i-th residual block. Without residual blocks (VGG), i is the (i+1)-th conv unit.
    - ``name``: the module's name in ``model.named_modules()`` ("stem" for the stem).
    - ``depth``: conv layers on the longest path from the input (stem convs, then each
      block's branch convs; projection shortcuts are not on the longest path).
    - ``avg_sq_mean``, ``avg_var``: see the module docstring; ``branch_var``: the residual
      branch output's average channel variance, None for the stem and for VGG.
    """
    blocks = [(name, m) for name, m in model.named_modules() if isinstance(m, ResidualBlock)]
    records, handles, branch_vars = [], [], {}

    def recorder(name: str, depth: int):
        def hook(module, args, out=None):
            # A pre-hook (the stem's output is the first block's input) gets no output.
            avg_sq_mean, avg_var = channel_stats(args[0] if out is None else out)
            records.append({"block": len(records), "name": name, "depth": depth, "avg_sq_mean": avg_sq_mean,
                            "avg_var": avg_var, "branch_var": branch_vars.pop(getattr(module, "branch", None), None)})
        return hook

    def branch_hook(branch, args, out):
        branch_vars[branch] = channel_stats(out)[1]

    if blocks:
        depth = 0
        for _, m in model.named_modules():
            if m is blocks[0][1]:
                break
            depth += isinstance(m, nn.Conv2d)
        handles.append(blocks[0][1].register_forward_pre_hook(recorder("stem", depth)))
        for name, block in blocks:
            depth += sum(isinstance(m, nn.Conv2d) for m in block.branch.modules())
            handles.append(block.branch.register_forward_hook(branch_hook))
            handles.append(block.register_forward_hook(recorder(name, depth)))
    else:
        units = _conv_units(model)
        if not units:
            raise ValueError(f"{type(model).__name__} has neither residual blocks nor conv layers to measure")
        handles += [last.register_forward_hook(recorder(name, depth)) for depth, (name, last) in enumerate(units, 1)]
    _forward(model, x, handles)
    return records


def conv_mean_shift(model: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """The average squared channel mean of every Conv2d's output on the batch ``x``,
    keyed by the conv's name in ``model.named_modules()``, in forward order. One forward
    pass in the same mode as ``signal_propagation``: cheap enough for every evaluation."""
    out = {}

    def recorder(name: str):
        def hook(module, args, y):
            out[name] = channel_stats(y)[0]
        return hook

    _forward(model, x, [m.register_forward_hook(recorder(name)) for name, m in model.named_modules()
                        if isinstance(m, nn.Conv2d)])
    return out


def tensorboard_tag(stat: str, block: int) -> str:
    return f"signal_prop/{stat}/block_{block:03d}"


def record_signal_prop(model: nn.Module, path, epoch: int, writer=None, input_shape=(3, 32, 32),
                       device="cpu", *, batch_size: int = 64, seed: int = 0) -> list[dict]:
    """Measure ``signal_propagation`` on ``gaussian_batch(input_shape, batch_size, seed)``
    and append the records to ``path`` (a run folder, written to ``path/signal_prop.jsonl``,
    or a file path ending in ``.jsonl``; None: measure only), one JSON line per record,
    flushed to disk::

        {"epoch": 0, "block": 0, "name": "stem", "depth": 1,
         "avg_sq_mean": 0.0012, "avg_var": 0.98, "branch_var": null}

    ``epoch``: 0 at init, N after the N-th epoch; the other keys are those of
    ``signal_propagation``. With a TensorBoard ``writer`` every statistic is also logged as
    ``signal_prop/<stat>/block_<NNN>`` at step ``epoch`` (``branch_var`` where not null).
    Returns the records as written."""
    x = gaussian_batch(input_shape, batch_size, seed, device, next(model.parameters()).dtype)
    records = [{"epoch": epoch, **r} for r in signal_propagation(model, x)]
    if path is None:  # measured only (a distributed run's other ranks)
        return records
    path = Path(path)
    if path.suffix != ".jsonl":
        path = path / FILENAME
    path.parent.mkdir(parents=True, exist_ok=True)
    append_jsonl(path, records)
    if writer is not None:
        for r in records:
            for stat in STATS:
                if r[stat] is not None:
                    writer.add_scalar(tensorboard_tag(stat, r["block"]), r[stat], epoch)
        writer.flush()
    return records
