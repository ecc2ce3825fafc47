"""VGG (Simonyan & Zisserman 2015, arXiv 1409.1556) built from a method's layer factories.

ImageNet inputs: torchvision's ``vggXX_bn`` layout (7x7 adaptive pool, two 4096-wide
hidden layers with dropout). Inputs of 64 px or less: the CIFAR variant used by the
MimicNorm and BN literature (global pool, one linear classifier), with ceil-mode pooling
so that 28-px images still reach 1x1 after five pools instead of vanishing.
"""

from __future__ import annotations

from torch import nn

from ..methods.base import Method

CONFIGS = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    13: [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    19: [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
         512, 512, 512, 512, "M"],
}


class VGG(nn.Module):
    def __init__(self, method: Method, depth: int, *, in_channels: int, num_classes: int,
                 small_input: bool):
        super().__init__()
        layers, ch = [], in_channels
        for v in CONFIGS[depth]:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2, ceil_mode=small_input))
            else:
                role = "stem" if ch == in_channels and not layers else "body"
                layers += [method.conv(ch, v, 3, role=role, bias=True), method.norm(v), method.act()]
                ch = v
        self.features = nn.Sequential(*layers)
        if small_input:
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.classifier = method.head(ch, num_classes)
        else:
            self.pool = nn.AdaptiveAvgPool2d(7)
            self.classifier = nn.Sequential(
                method.linear(ch * 49, 4096), method.act(), nn.Dropout(),
                method.linear(4096, 4096), method.act(), nn.Dropout(),
                method.head(4096, num_classes),
            )

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)).flatten(1))


def vgg(depth: int):
    def build(method, *, in_channels, num_classes, small_input):
        return VGG(method, depth, in_channels=in_channels, num_classes=num_classes,
                   small_input=small_input)
    return build


ARCHITECTURES = {f"vgg{d}": vgg(d) for d in CONFIGS}
