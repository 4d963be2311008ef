"""Models by name through timm's registry, plus the small models dldr registers there."""
from __future__ import annotations

import math

import timm
from timm.models import register_model
from torch import nn

from dldr import cifar_resnet  # noqa: F401  (registers cifar_resnet20, 32, 44, 56, 110 with timm)
from dldr.errors import DldrError

# Registered models whose first layer depends on the input size, so it is passed to them.
_TAKES_IMG_SIZE = {"mlp"}


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
def mlp(pretrained: bool = False, num_classes: int = 10, in_chans: int = 1,
        img_size: tuple[int, int] = (8, 8), hidden: tuple[int, ...] = (256, 256), **kwargs) -> MLP:
    """Two hidden layers of 256 by default; timm's create_model passes its own kwargs, ignored."""
    if pretrained:
        raise DldrError("mlp has no pretrained weights")
    return MLP(in_chans * math.prod(img_size), num_classes, tuple(hidden))


def create(name: str, num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    if not timm.is_model(name):
        raise DldrError(f"unknown model {name!r}; use a timm model name (see timm.list_models()), "
                        "cifar_resnet20/32/44/56/110 or mlp")
    kwargs = {"num_classes": num_classes, "in_chans": input_shape[0]}
    if name in _TAKES_IMG_SIZE:
        kwargs["img_size"] = tuple(input_shape[1:])
    return timm.create_model(name, pretrained=False, **kwargs)
