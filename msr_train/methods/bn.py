"""BatchNorm baseline (Ioffe & Szegedy 2015, arXiv 1502.03167).

Standard ResNet/VGG: BatchNorm2d after every conv, before the ReLU, batch statistics in
training and running statistics in evaluation; torchvision's initialisation (Kaiming
normal, fan-out). ResNet convs have no bias; VGG keeps torchvision's conv bias so the
parameter counts equal torchvision's ``vggXX_bn`` exactly (the bias is redundant before
BN, and harmless). ``sync_bn`` turns the layers into SyncBatchNorm when the run is
distributed.
"""

import torch
from torch import nn

from ..errors import ConfigError
from ..rules import flag
from .base import Method


class BatchNorm(Method):
    name = "bn"

    rules = {**Method.rules, "sync_bn": flag(note="SyncBatchNorm across processes, CUDA only")}

    def check_processes(self, world_size, device):
        if self.cfg.sync_bn and device.type != "cuda":
            raise ConfigError("method.sync_bn=true needs CUDA devices (SyncBatchNorm has no CPU kernel); "
                              "drop it on the CPU")

    def convert_for_processes(self, model):
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model) if self.cfg.sync_bn else model

    def norm(self, channels, *, role="body"):
        return nn.BatchNorm2d(channels)

    def finalize(self, model):
        kaiming_init_(model)


def kaiming_init_(model: nn.Module) -> None:
    """torchvision's ResNet/VGG init: convs Kaiming normal (fan-out), conv biases 0, BN
    gains 1 and biases 0 (other norms keep the gain they were built with)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
