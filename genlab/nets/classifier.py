"""Classifiers: genlab's own measuring sticks for sample quality (features and labels)."""

import torch
from torch import Tensor, nn

from genlab.nets.shapes import check_divisible


class SmallCNN(nn.Module):
    """x in [0, 1] [B, C, s, s] -> class logits; ``features`` is the 128-d layer before them."""

    def __init__(self, channels: int = 1, image_size: int = 28, n_classes: int = 10, width: int = 32):
        super().__init__()
        check_divisible("SmallCNN", channels, image_size, 4)
        self.body = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(2 * width * (image_size // 4) ** 2, 128), nn.ReLU(),
        )
        self.drop = nn.Dropout(0.3)
        self.head = nn.Linear(128, n_classes)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x * 2 - 1)  # [B, 128]

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.drop(self.features(x)))


def _conv(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class _Residual(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.f = nn.Sequential(*_conv(channels, channels), *_conv(channels, channels))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.f(x)


class ResNetClassifier(nn.Module):
    """x in [0, 1] [B, C, s, s] (s a multiple of 8) -> class logits; ``features`` is the max-pooled 8*width-d
    layer before them. The shape of Page's ResNet-9 (the DAWNBench CIFAR-10 network), at a quarter of its width
    for width=16: 0.41 M parameters, 128-d features. genlab's measuring stick for colour images."""

    def __init__(self, channels: int = 3, image_size: int = 32, n_classes: int = 10, width: int = 16):
        super().__init__()
        check_divisible("ResNetClassifier", channels, image_size, 8)
        c = width
        self.body = nn.Sequential(
            *_conv(channels, c),
            *_conv(c, 2 * c), nn.MaxPool2d(2), _Residual(2 * c),
            *_conv(2 * c, 4 * c), nn.MaxPool2d(2),
            *_conv(4 * c, 8 * c), nn.MaxPool2d(2), _Residual(8 * c),
            nn.AdaptiveMaxPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(8 * c, n_classes, bias=False)
        self.to(memory_format=torch.channels_last)  # the CPU's and the GPU's faster layout for these convolutions

    def features(self, x: Tensor) -> Tensor:
        return self.body((x * 2 - 1).contiguous(memory_format=torch.channels_last))  # [B, 8 * width]

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))
