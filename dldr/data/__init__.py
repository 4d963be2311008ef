"""Data sets by one ``--data`` spec, each a ``DataSource`` that deals a rank its share of a batch.

==================================  =====================================================
``digits``                          scikit-learn's bundled 8x8 digits (real, no download)
``fashion-mnist[:DIR]``             Fashion-MNIST's IDX files (default: the Debian package's folder)
``mnist:DIR``, ``kmnist:DIR``       MNIST's, KMNIST's IDX files
``cifar10:DIR``, ``cifar100:DIR``   the python-version CIFAR folders, crop + flip
``imagefolder:DIR``                 DIR/train/CLASS/*, DIR/val/CLASS/*; ImageNet crops
``ffcv:TRAIN.beton,VAL.beton``      files written by ``dldr data convert``
``synthetic:CxHxW:K[:N]``           seeded random pixels and labels, any shape
==================================  =====================================================
"""
from __future__ import annotations

from dldr.data import tensors
from dldr.data.cifar import LAYOUTS as CIFAR_LAYOUTS
from dldr.data.idx import LAYOUTS as IDX_LAYOUTS
from dldr.data.source import DataSource, noisy_labels
from dldr.errors import DldrError

SPECS = ("digits, fashion-mnist[:DIR], mnist:DIR, kmnist:DIR, cifar10:DIR, cifar100:DIR, imagefolder:DIR, "
         "ffcv:TRAIN.beton,VAL.beton or synthetic:CxHxW:K[:N]")

__all__ = ["SPECS", "DataSource", "load", "noisy_labels"]


def load(spec: str, label_noise: float = 0.0, seed: int = 0, image_size: int = 224,
         loader_workers: int = 2, holdout: float = 0.0) -> DataSource:
    """The data set ``spec`` names, with a seeded ``label_noise`` fraction of its training labels redrawn.

    ``holdout`` moves a seeded fraction of the (noisy) training images to a validation set:
    under label noise, the noisy labels are all a user has to validate on.

    ``image_size`` is the crop of ImageFolder data (and of .beton files converted from it);
    ``loader_workers`` are the decoding processes (threads for ffcv) of those two.
    """
    name, _, args = spec.partition(":")
    if name == "digits" and not args:
        data: DataSource = tensors.digits()
    elif name in IDX_LAYOUTS:
        data = tensors.idx_folder(name, args)
    elif name in CIFAR_LAYOUTS and args:
        data = tensors.cifar_folder(name, args)
    elif name == "imagefolder" and args:
        from dldr.data.imagefolder import ImageFolderSource

        data = ImageFolderSource(args, image_size, loader_workers)
    elif name == "ffcv" and args:
        from dldr.data.beton import BetonSource

        data = BetonSource(args, image_size, loader_workers)
    elif name == "synthetic":
        data = tensors.synthetic(args)
    else:
        raise DldrError(f"unknown data set {spec!r}; use {SPECS}")
    if label_noise > 0:
        data.train_labels = noisy_labels(data.train_labels, label_noise, data.num_classes, seed)
    if holdout > 0:
        data.hold_out(holdout, seed)
    return data
