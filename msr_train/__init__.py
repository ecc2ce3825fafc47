"""msr-train: train ResNet and VGG classifiers with or without BatchNorm and compare."""

__version__ = "0.1.0"
