"""A small CNN classifier: genlab's own measuring stick for sample quality (features and labels)."""

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
