"""The contract between architectures, the training loop and a training method.

A method (BatchNorm, Mean Shift Rejection, NF-ResNets, ...) decides which layers an
architecture is built from and what happens around the optimizer step. Architectures
only call the layer factories below (the way timm models take conv / norm / act layers),
and the loop only calls the hooks, so a new method is one subclass and one config file:
neither the models nor the loop change.

Every factory has a default that gives the unnormalised network; a method overrides what
it changes. The residual block factories (``branch_end``, ``residual_join``) receive the
block's ``BlockPosition``, so per-block constants (NF's beta, MimicNorm's branch gain,
stochastic depth rates) are set when the block is built, as timm's nfnet.py does. A
method's ``initialize`` may walk the built model once (NF folds its input scales into
each block); the step hooks work on what ``bind`` collected from the model they are
given.

Adding a method: a module in this package with a ``Method`` subclass that sets ``name``
(it registers itself, see ``msr_train.methods``) and ``conf/method/<name>.yaml`` with its
settings (``name`` and ``lr`` at least).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

import torch
from torch import nn

from ..clipping import BoundToParameters, Clipping
from ..rules import Rule, check_group, number, text


#: The attribute finalize sets on a model: the method (object) it was finalized for.
FINALIZED = "msr_train_method"


@dataclasses.dataclass(frozen=True)
class BlockPosition:
    """Where a residual block sits in its network, as the architecture builds it."""

    #: 0-based, over the whole network in forward order.
    index: int
    #: Residual blocks in the network.
    count: int
    #: The block changes stride or width: its shortcut starts a new residual stream.
    transition: bool
    #: Residual branches summed into this block's input since the stream started (at the
    #: stem or at the last transition block's output, which counts as one).
    stream_depth: int
    #: Convolutions in the block's residual branch.
    branch_convs: int


class BranchGain(nn.Module):
    """A learnable scalar that ends a residual branch (SkipInit, MimicNorm's branch scale)."""

    def __init__(self, init: float = 1.0):
        super().__init__()
        self.gain = nn.Parameter(torch.tensor(float(init)))

    def forward(self, x):
        return x * self.gain


class PostActivationJoin(nn.Module):
    """The original ResNet merge (He et al. 2016): out = act(branch(x) + shortcut(x))."""

    def __init__(self, act: nn.Module):
        super().__init__()
        self.act = act

    def forward(self, x, branch: nn.Module, shortcut: nn.Module):
        return self.act(branch(x) + shortcut(x))


class Method(BoundToParameters):
    """Base class: the unnormalised network with PyTorch's default initialisation."""

    name = "base"
    #: The residual stream carries pre-activations: the stem has no activation and the
    #: network applies one before pooling (pre-activation ResNets, NF-ResNets).
    preactivation = False
    #: Transitions need a (1x1 conv) projection shortcut even where the architecture
    #: would use a parameter-free one (CIFAR ResNets' option A).
    needs_projection_shortcut = False
    #: Every setting of conf/method/<name>.yaml -> its rule (see msr_train.rules); a
    #: subclass extends the base table: ``rules = {**Method.rules, ...}``.
    rules: dict[str, Rule] = {
        "name": text(),
        "lr": number(0, 1e6, lo_open=True, note="this method's default optimizer.lr (SGD, at "
                     "optimizer.base_batch_size), chosen on validation"),
    }
    #: Every method by name: a subclass that sets ``name`` registers itself.
    registry: dict[str, type[Method]] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            Method.registry[cls.name] = cls

    def __init__(self, cfg=None, batch_size: int | None = None, micro_batch: int | None = None):
        self.cfg = cfg
        #: The global batch of one optimizer step, for defaults that depend on it (None: unknown).
        self.batch_size = batch_size
        #: The examples of one forward pass in one process (batch_size without gradient
        #: accumulation or several processes).
        self.micro_batch = micro_batch or batch_size

    # ------------------------------------------------------------------ layer factories
    def conv(self, in_ch: int, out_ch: int, kernel_size: int, stride: int = 1, *,
             role: str = "body", bias: bool = False) -> nn.Module:
        """A 'same'-padded conv. ``role`` is 'stem' (sees the input image), 'body' or
        'shortcut'; ``bias`` is what the reference architecture uses (torchvision's
        VGG has conv biases, its ResNets do not). Methods may override both."""
        return nn.Conv2d(in_ch, out_ch, kernel_size, stride, padding=kernel_size // 2, bias=bias)

    def norm(self, channels: int, *, role: str = "body") -> nn.Module:
        """What sits where BatchNorm would: after a conv, before the activation. ``role``
        is 'branch_end' for the last one of a residual branch, else 'body'."""
        return nn.Identity()

    def act(self) -> nn.Module:
        return nn.ReLU(inplace=True)

    def linear(self, in_features: int, out_features: int) -> nn.Module:
        """A hidden fully connected layer (VGG's classifier)."""
        return nn.Linear(in_features, out_features)

    def head(self, in_features: int, num_classes: int) -> nn.Module:
        """The final classifier producing logits."""
        return nn.Linear(in_features, num_classes)

    def branch_end(self, position: BlockPosition) -> nn.Module:
        """Closes every residual branch (a gain for SkipInit-style methods)."""
        return nn.Identity()

    def residual_join(self, position: BlockPosition) -> nn.Module:
        """Combines a residual block's branch and shortcut."""
        return PostActivationJoin(self.act())

    def convert_refusal(self) -> str | None:
        """Why this method cannot be applied to another model by swapping its layers
        (msr_train.convert), or None: a method whose architecture differs (joins, gains,
        heads) needs build_model."""
        return None

    # ------------------------------------------------------------------ hooks
    def check(self, cfg) -> None:
        """Reject a configuration this method cannot train, before any work is done:
        every setting against ``rules`` (unknown settings included)."""
        check_group("method", cfg, self.rules)

    def check_micro_batch(self, micro_batch: int) -> None:
        """Reject a micro-batch size (examples per forward pass) this method cannot learn
        from, before any work is done. BatchNorm layers that see one value per channel
        are found for every method by checks.check_batchnorm_trainable."""

    def check_processes(self, world_size: int, device: torch.device) -> None:
        """Reject, before any process starts, a run on ``world_size`` processes on
        ``device``s that this method's settings cannot train."""

    def convert_for_processes(self, model: nn.Module) -> nn.Module:
        """The model as several processes train it (DDP); e.g. SyncBatchNorm layers."""
        return model

    def finalize(self, model: nn.Module) -> None:
        """Called once on the built (or converted) model: ``initialize``, then ``bind``. A
        second call would re-initialise trained weights, so it is refused."""
        done = getattr(model, FINALIZED, None)
        if done is not None:
            raise ValueError(f"this model was already finalized for method {done.name!r}: finalize again would "
                             "re-initialise its weights. build_model and convert finalize; attach the hooks "
                             "with msr_train.attach(optimizer, model)")
        self.initialize(model)
        self.ensure_bound(model)
        setattr(model, FINALIZED, self)

    def initialize(self, model: nn.Module) -> None:
        """The method's initialisation of the built model (once)."""

    def bind(self, model: nn.Module) -> None:
        """Collect what the step hooks work on (parameter lists, layers) from ``model``.
        Called again by ``ensure_bound`` (BoundToParameters) whenever the model's
        parameters are no longer the bound ones, so the hooks never act on stale tensors."""

    def param_groups(self, model: nn.Module) -> list[dict]:
        """Optimizer parameter groups; a group may carry ``lr_mult`` (scales the lr)."""
        return [{"params": [p for p in model.parameters() if p.requires_grad]}]

    def clipping(self) -> Clipping:
        """The gradient clipping this method trains with by default (nf's AGC, bnp's global
        norm): the trainer's clipper applies it with its own settings, before ``before_step``."""
        return Clipping()

    def before_step(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Gradients are final here: accumulated, all-reduced and unscaled. The caller has
        called ``ensure_bound(model)`` (train_step and msr_train.attach do)."""

    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Parameters have just been updated by the optimizer."""

    def compile_step_hooks(self, mode: str = "default") -> None:
        """``trainer.compile``: torch.compile ``before_step`` and ``after_step`` too, in the
        model's ``mode``. They are many small ops on every parameter (MSR's anchors and
        ZMG are several per weight), and at batch 1 a step is mostly per-op overhead
        (their share, eager and compiled: docs/benchmarks.md, "Compiled")."""
        self.before_step = torch.compile(self.before_step, mode=mode)
        self.after_step = torch.compile(self.after_step, mode=mode)

    def before_evaluation(self, model: nn.Module, training_batches: Callable[[int], Iterable], ctx) -> None:
        """Called before every evaluation (all ranks). ``training_batches(n)`` yields n
        training inputs of the micro-batch size, as training sees them;
        ``ctx`` (distributed.Context) sums tensors over the processes."""

