"""A method applied to a model msr-train did not build (a torchvision or timm ResNet or
VGG, one's own network): every BatchNorm2d becomes the method's norm, every conv and
linear layer the method's, built by the same layer factories msr-train's architectures
call (methods.base), then the method initialises the model as it wants and binds its
step hooks. Pretrained weights are not kept: the method's initialisation is part of it.

Roles, which some methods treat apart (MSR's plain stem, its anchors), are read off the
model: the first conv in module order is the stem; a conv under a module named
``downsample`` or ``shortcut`` (torchvision's and timm's ResNets) is a shortcut; the last
linear layer is the classifier; in a residual block (a module with a ``downsample``
attribute) the last BatchNorm of the branch closes it (``branch_end``, where GroupNorm's
``zero_init_last`` acts).

What swapping layers cannot give is refused with a ValueError naming the layer: NF-ResNets
and MimicNorm change the architecture itself (alpha/beta joins, a pre-activation stream,
branch gains, a BN on the logits): use ``msr_train.build_model``. A conv that a method's
factory cannot rebuild (grouped, dilated, or padded other than 'same') is refused, as is a
norm layer other than BatchNorm2d.
"""

from __future__ import annotations

from torch import nn

from .methods.base import FINALIZED, Method

SHORTCUT_NAMES = ("downsample", "shortcut")


def conv_problem(conv: nn.Conv2d) -> str | None:
    """Why the method's factory (a 'same'-padded conv of a square kernel) cannot rebuild ``conv``."""
    k, s, p = conv.kernel_size, conv.stride, conv.padding
    if conv.groups != 1:
        return f"groups={conv.groups}"
    if conv.dilation != (1, 1):
        return f"dilation={conv.dilation}"
    if k[0] != k[1] or s[0] != s[1]:
        return f"kernel {k}, stride {s} (square ones only)"
    if p != (k[0] // 2, k[0] // 2) or conv.padding_mode != "zeros":
        return f"padding={p} ({conv.padding_mode}; 'same' zero padding, {k[0] // 2}, only)"
    return None


def _role(name: str, first_conv: str) -> str:
    if name == first_conv:
        return "stem"
    return "shortcut" if any(part in SHORTCUT_NAMES for part in name.split(".")) else "body"


def _branch_ends(model: nn.Module) -> set[str]:
    """The last BatchNorm of each residual branch (blocks that own a ``downsample``)."""
    ends = set()
    for block_name, block in model.named_modules():
        if hasattr(block, "downsample"):
            norms = [n for n, m in block.named_children() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
            if norms:
                ends.add(f"{block_name}.{norms[-1]}" if block_name else norms[-1])
    return ends


def _replacement(name: str, layer: nn.Module, method: Method, roles: dict) -> nn.Module | None:
    if isinstance(layer, nn.Conv2d):
        problem = conv_problem(layer)
        if problem is not None:
            raise ValueError(f"layer {name!r} ({layer}) cannot be converted to method {method.name!r}: {problem}")
        return method.conv(layer.in_channels, layer.out_channels, layer.kernel_size[0], layer.stride[0],
                           role=_role(name, roles["stem"]), bias=layer.bias is not None)
    if isinstance(layer, nn.Linear):
        if name == roles["head"]:
            return method.head(layer.in_features, layer.out_features)
        return method.linear(layer.in_features, layer.out_features)
    if isinstance(layer, nn.modules.batchnorm._BatchNorm):
        if type(layer) not in (nn.BatchNorm2d, nn.SyncBatchNorm) or layer.num_features is None:
            raise ValueError(f"layer {name!r} ({type(layer).__name__}) cannot be converted: only BatchNorm2d "
                             "layers are replaced by a method's norm")
        return method.norm(layer.num_features, role="branch_end" if name in roles["branch_ends"] else "body")
    return None


def convert(model: nn.Module, method: Method) -> nn.Module:
    """``model`` with ``method``'s layers in place of its own (in place; also returned),
    initialised by the method, its hooks bound: train it with an optimizer on
    ``msr_train.param_groups(model, ...)`` and ``msr_train.attach(optimizer, model)``."""
    refusal = method.convert_refusal()
    if refusal is not None:
        raise ValueError(f"method {method.name!r} cannot be applied by swapping layers: {refusal}; build one of "
                         "msr-train's architectures with msr_train.build_model(name, method, ...) instead")
    if getattr(model, FINALIZED, None) is not None:
        raise ValueError(f"this model is already method {getattr(model, FINALIZED).name!r}'s: convert the original model")
    named = list(model.named_modules())
    convs = [n for n, m in named if isinstance(m, nn.Conv2d)]
    linears = [n for n, m in named if isinstance(m, nn.Linear)]
    roles = {"stem": convs[0] if convs else None, "head": linears[-1] if linears else None,
             "branch_ends": _branch_ends(model)}
    swaps = [(n, new) for n, m in named if n and (new := _replacement(n, m, method, roles)) is not None]
    for name, new in swaps:  # every layer checked before the first swap: a refusal leaves the model as it was
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    method.finalize(model)
    return model
