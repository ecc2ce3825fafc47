"""BatchNorm baseline (Ioffe & Szegedy 2015, arXiv 1502.03167).

Standard ResNet/VGG: BatchNorm2d after every conv, before the ReLU, batch statistics in
training and running statistics in evaluation; torchvision's initialisation (Kaiming
normal, fan-out). ResNet convs have no bias; VGG keeps torchvision's conv bias so the
parameter counts equal torchvision's ``vggXX_bn`` exactly (the bias is redundant before
BN, and harmless). ``sync_bn`` turns the layers into SyncBatchNorm when the run is
distributed.
"""

from torch import nn

from .base import Method


class BatchNorm(Method):
    name = "bn"

    def norm(self, channels):
        return nn.BatchNorm2d(channels)

    def finalize(self, model):
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
