"""A realistic primary for the overhead benchmark: a ResNet-18-sized CNN for small images.

The CIFAR form of ResNet-18 (He et al. 2016): a 3x3 stem without pooling, four layers of two basic
blocks (``width``, 2x, 4x, 8x channels; strides 1, 2, 2, 2), global average pooling and a linear
head. Built from ``torch.nn`` blocks with random weights (enough for timing), wrapped as a
:class:`~fallbackformer.MultiExitNet` with one head (the stem and the four layers are its stages).
"""

from __future__ import annotations

from torch import Tensor, nn

from fallbackformer.models.multi_exit import MultiExitNet
from fallbackformer.runtime.validation import InputSpec

__all__ = ["BasicBlock", "resnet18_exits", "small_image_student", "resnet_input_spec"]


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and a residual connection (a 1x1 projection when shapes change)."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = (nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
                         if stride != 1 or c_in != c_out else nn.Identity())

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn1(self.conv1(x)).relu()
        return (self.bn2(self.conv2(out)) + self.shortcut(x)).relu()


def resnet18_exits(num_classes: int = 10, width: int = 64, in_channels: int = 3) -> MultiExitNet:
    """ResNet-18 (CIFAR form) as a one-head :class:`MultiExitNet`: stages stem, layer1..layer4."""
    widths = [width, 2 * width, 4 * width, 8 * width]
    stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
    stages: list[nn.Module] = [stem]
    c_in = width
    for k, c in enumerate(widths):
        stride = 1 if k == 0 else 2
        stages.append(nn.Sequential(BasicBlock(c_in, c, stride), BasicBlock(c, c)))
        c_in = c
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, num_classes))
    return MultiExitNet(stages, {len(stages) - 1: head}).eval()


def small_image_student(num_classes: int = 10, in_channels: int = 3, width: int = 16) -> nn.Module:
    """A small fallback for the same images: one strided convolution, pooling, a linear head."""
    return nn.Sequential(nn.Conv2d(in_channels, width, 3, 2, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(width, num_classes)).eval()


def resnet_input_spec(size: int, in_channels: int = 3) -> InputSpec:
    """Images ``[in_channels, size, size]`` with values in ``[0, 1]``."""
    return InputSpec(shape=(in_channels, size, size), value_range=(0.0, 1.0),
                     description="random images in [0, 1] (timing only)")
