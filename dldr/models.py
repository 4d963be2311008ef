"""Models by name through timm's registry, plus the small models dldr registers there."""

from __future__ import annotations

import math

import timm
import torch
from timm.models import register_model
from torch import nn

from dldr import (
    cifar_resnet,  # noqa: F401  (registers cifar_resnet20, 32, 44, 56, 110 with timm)
    small_cnns,  # noqa: F401  (registers lenet5 and cnn_pool with timm)
)
from dldr.errors import DldrError


class MLP(nn.Module):
    """A fully connected ReLU network on flattened images."""

    def __init__(self, in_features: int, num_classes: int, hidden: tuple[int, ...] = (256, 256)):
        super().__init__()
        widths = (in_features, *hidden)
        layers: list[nn.Module] = [nn.Flatten()]
        for a, b in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.num_classes = num_classes
        self.head = nn.Linear(widths[-1], num_classes)

    def forward(self, x):
        return self.head(self.features(x))


@register_model
def mlp(
    pretrained: bool = False,
    num_classes: int = 10,
    in_chans: int = 1,
    img_size: tuple[int, int] = (8, 8),
    hidden: tuple[int, ...] = (256, 256),
    **kwargs,
) -> MLP:
    """Two hidden layers of 256 by default; timm's create_model passes its own kwargs, ignored."""
    if pretrained:
        raise DldrError("mlp has no pretrained weights")
    return MLP(in_chans * math.prod(img_size), num_classes, tuple(hidden))


class SmallCNN(nn.Module):
    """Two 3x3 convolutions with BatchNorm, then a linear head on a 4x4 pooled grid: a CNN for small images."""

    def __init__(self, in_chans: int, num_classes: int, widths: tuple[int, int] = (32, 64)):
        super().__init__()
        layers: list[nn.Module] = []
        for a, b in zip((in_chans, widths[0]), widths):
            layers += [nn.Conv2d(a, b, 3, padding=1, bias=False), nn.BatchNorm2d(b), nn.ReLU()]
        self.features = nn.Sequential(*layers, nn.AdaptiveMaxPool2d(4), nn.Flatten())
        self.num_classes = num_classes
        self.head = nn.Linear(widths[1] * 16, num_classes)

    def forward(self, x):
        return self.head(self.features(x))


@register_model
def cnn(pretrained: bool = False, num_classes: int = 10, in_chans: int = 1, **kwargs) -> SmallCNN:
    """29k parameters on digits: the benchmarks' small CNN."""
    if pretrained:
        raise DldrError("cnn has no pretrained weights")
    return SmallCNN(in_chans, num_classes)


def create(name: str, num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    """``name`` for the data set's classes, channels and image size (for models built for one size)."""
    if not timm.is_model(name):
        raise DldrError(
            f"unknown model {name!r}; use a timm model name (see timm.list_models()), "
            "cifar_resnet20/32/44/56/110, mlp, cnn, lenet5 or cnn_pool"
        )
    kwargs = {"num_classes": num_classes, "in_chans": input_shape[0]}
    try:
        try:
            return timm.create_model(name, pretrained=False, img_size=tuple(input_shape[1:]), **kwargs)
        except TypeError as e:
            if "img_size" not in str(e):  # the model takes any size
                raise
            return timm.create_model(name, pretrained=False, **kwargs)
    except Exception as e:  # noqa: BLE001  (timm models reject sizes in many ways)
        raise _cannot_take(name, input_shape, e) from None


def check_input(model: nn.Module, name: str, input_shape: tuple[int, ...]) -> None:
    """One forward of a blank image, so a size the model cannot take fails before any run starts."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, *input_shape))
    except Exception as e:  # noqa: BLE001
        raise _cannot_take(name, input_shape, e) from None
    finally:
        model.train(was_training)


def _cannot_take(name: str, input_shape: tuple[int, ...], error: Exception) -> DldrError:
    first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    shape = "x".join(map(str, input_shape))
    return DldrError(
        f"{name} cannot take {shape} images ({first_line}); pick a model for this size, "
        "or another --image-size for imagefolder and ffcv data"
    )
