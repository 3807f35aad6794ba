"""A ResNet-18-shaped CNN written out (torchvision's wheels need a CUDA build of torch): BasicBlocks [2, 2, 2, 2].

The CIFAR stem (a 3x3 convolution, no max pooling) keeps the network piecewise linear in its parameters between
ReLU kinks, so the slow references locate every kink; ``widths`` narrows it for the tests, the default is the full
64/128/256/512 network the benchmark records.
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["BasicBlock", "ResNet18"]


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and a shortcut (a strided 1x1 convolution when the shape changes)."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu2 = nn.ReLU()
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: Tensor) -> Tensor:
        h = self.relu1(self.bn1(self.conv1(x)))
        return self.relu2(self.bn2(self.conv2(h)) + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for ``(n, 3, 32, 32)`` inputs: stem, four stages of two BasicBlocks, average pool, linear head."""

    def __init__(self, widths: tuple[int, int, int, int] = (64, 128, 256, 512), n_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        blocks, c_in = [], widths[0]
        for stage, width in enumerate(widths):
            for b in range(2):
                blocks.append(BasicBlock(c_in, width, 2 if stage > 0 and b == 0 else 1))
                c_in = width
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(widths[-1], n_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.pool(self.blocks(self.stem(x))).flatten(1))
