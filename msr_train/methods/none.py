"""The unnormalised control: the BN architecture with BN removed, conv bias on, and
PyTorch's default initialisation (docs/methods.md, 'none')."""

from .base import Method


class NoNorm(Method):
    name = "none"

    def conv(self, in_ch, out_ch, kernel_size, stride=1, *, role="body", bias=False):
        return super().conv(in_ch, out_ch, kernel_size, stride, role=role, bias=True)
