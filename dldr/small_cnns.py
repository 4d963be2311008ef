"""CNNs for small grayscale images such as the MNIST family's 28 x 28, registered with timm.

``lenet5``  LeCun et al.'s LeNet-5 as it is trained today: two 5 x 5 convolutions (6 and 16
            channels) with ReLU and 2 x 2 max pooling, then 120 - 84 - classes (61.7k
            parameters on 28 x 28, where the first convolution pads by 2 as LeNet-5 padded
            MNIST to 32 x 32).
``cnn_pool`` two stages of a 3 x 3 convolution, BatchNorm, ReLU and 2 x 2 max pooling (16 and
            32 channels), then a linear head on the pooled grid (20.5k parameters on 28 x 28).

Both size their first linear layer by the image size they are created for; the smallest image
they take is 12 x 12 (``lenet5``) and 4 x 4 (``cnn_pool``).
"""

from __future__ import annotations

from timm.models import register_model
from torch import nn

from dldr.errors import DldrError


class LeNet5(nn.Module):
    def __init__(self, in_chans: int, num_classes: int, img_size: tuple[int, int]):
        super().__init__()
        h, w = ((s // 2 - 4) // 2 for s in img_size)  # after pad-2 conv, pool, valid conv, pool
        if h < 1 or w < 1:
            raise ValueError(f"lenet5 needs images of at least 12 x 12, got {img_size[0]} x {img_size[1]}")
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, 6, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        self.num_classes = num_classes
        self.head = nn.Sequential(
            nn.Linear(16 * h * w, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, num_classes)
        )

    def forward(self, x):
        return self.head(self.features(x))


class PoolCNN(nn.Module):
    def __init__(self, in_chans: int, num_classes: int, img_size: tuple[int, int], widths: tuple[int, int] = (16, 32)):
        super().__init__()
        h, w = (s // 4 for s in img_size)
        if h < 1 or w < 1:
            raise ValueError(f"cnn_pool needs images of at least 4 x 4, got {img_size[0]} x {img_size[1]}")
        layers: list[nn.Module] = []
        for a, b in zip((in_chans, widths[0]), widths):
            layers += [nn.Conv2d(a, b, 3, padding=1, bias=False), nn.BatchNorm2d(b), nn.ReLU(), nn.MaxPool2d(2)]
        self.features = nn.Sequential(*layers, nn.Flatten())
        self.num_classes = num_classes
        self.head = nn.Linear(widths[1] * h * w, num_classes)

    def forward(self, x):
        return self.head(self.features(x))


def _no_weights(name: str, pretrained: bool) -> None:
    if pretrained:
        raise DldrError(f"{name} has no pretrained weights")


# timm's create_model passes keyword arguments of its own (pretrained_cfg, ...); they are ignored.
@register_model
def lenet5(
    pretrained: bool = False, num_classes: int = 10, in_chans: int = 1, img_size: tuple[int, int] = (28, 28), **kwargs
) -> LeNet5:
    _no_weights("lenet5", pretrained)
    return LeNet5(in_chans, num_classes, tuple(img_size))


@register_model
def cnn_pool(
    pretrained: bool = False, num_classes: int = 10, in_chans: int = 1, img_size: tuple[int, int] = (28, 28), **kwargs
) -> PoolCNN:
    _no_weights("cnn_pool", pretrained)
    return PoolCNN(in_chans, num_classes, tuple(img_size))
