"""Data sets as in-memory tensors, seeded label noise, and the epoch's mini-batches.

``digits`` is scikit-learn's bundled 8x8 handwritten digits (real data, no download), split
into train and test with a fixed seed so every run sees the same split. ``cifar10:DIR`` and
``cifar100:DIR`` read the python-version CIFAR folders (``dldr.cifar``), normalised per channel
with CIFAR's own statistics and augmented in training with the standard 4-pixel random crop and
horizontal flip. ``synthetic:CxHxW:K`` is seeded noise with random labels of any shape, for
tests and throughput.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import BatchSampler, DistributedSampler

from dldr import cifar
from dldr.errors import DldrError

SPLIT_SEED = 0
DIGITS_TEST_FRACTION = 0.2
SYNTHETIC_SIZES = (512, 128)
# per-channel mean and standard deviation of each CIFAR training set
CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
CROP_PADDING = 4


@dataclass
class Dataset:
    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    augment: bool = False  # random crop with CROP_PADDING and horizontal flip, in training

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train_x.shape[1:])


def load(spec: str, label_noise: float = 0.0, seed: int = 0) -> Dataset:
    name, _, args = spec.partition(":")
    if name == "digits" and not args:
        data = _digits()
    elif name in cifar.LAYOUTS and args:
        data = _cifar(name, args)
    elif name == "synthetic":
        data = _synthetic(args)
    else:
        raise DldrError(f"unknown data set {spec!r}; use digits, cifar10:DIR, cifar100:DIR or synthetic[:CxHxW:K]")
    if label_noise > 0:
        data.train_y = noisy_labels(data.train_y, label_noise, data.num_classes, seed)
    return data


def _digits() -> Dataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(SPLIT_SEED))
    n_test = int(round(DIGITS_TEST_FRACTION * len(y)))
    test, train = order[:n_test], order[n_test:]
    mean, std = x[train].mean(), x[train].std()
    x = (x - mean) / std
    return Dataset("digits", x[train], y[train], x[test], y[test], num_classes=10)


def _cifar(kind: str, root: str) -> Dataset:
    train_x, train_y, test_x, test_y, classes = cifar.read(kind, root)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in CIFAR_STATS[kind])

    def normalise(x):
        return (torch.from_numpy(x).float() / 255.0 - mean) / std

    return Dataset(kind, normalise(train_x), torch.from_numpy(train_y), normalise(test_x), torch.from_numpy(test_y),
                   classes, augment=True)


def _synthetic(args: str) -> Dataset:
    shape_text, _, classes_text = (args or "3x32x32:10").partition(":")
    try:
        shape = tuple(int(s) for s in shape_text.split("x"))
        num_classes = int(classes_text or 10)
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1 or num_classes < 2:
        raise DldrError(f"synthetic data is synthetic:CxHxW:K (e.g. synthetic:3x32x32:10), got synthetic:{args}")
    g = torch.Generator().manual_seed(SPLIT_SEED)
    n = sum(SYNTHETIC_SIZES)
    x = torch.randn((n, *shape), generator=g)
    y = torch.randint(num_classes, (n,), generator=g)
    k = SYNTHETIC_SIZES[0]
    return Dataset(f"synthetic:{shape_text}:{num_classes}", x[:k], y[:k], x[k:], y[k:], num_classes)


def noisy_labels(labels: torch.Tensor, fraction: float, num_classes: int, seed: int) -> torch.Tensor:
    """Replace a seeded ``fraction`` of labels by a class drawn uniformly from all ``num_classes``."""
    g = torch.Generator().manual_seed(seed)
    flip = torch.rand(len(labels), generator=g) < fraction
    drawn = torch.randint(num_classes, (len(labels),), generator=g)
    return torch.where(flip, drawn, labels)


def batches(data: Dataset, batch_size: int, seed: int, epoch: int,
            rank: int = 0, world_size: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's part of the epoch's shuffled global mini-batches; the ragged tail is dropped.

    A ``DistributedSampler`` deals rank r every world_size-th index of one seeded permutation,
    so at each step the ranks' batches of batch_size / world_size together hold exactly the
    global batch a single process would draw: N = 1 and N = 2 follow the same trajectory. The
    augmentation of each image is drawn per (seed, epoch, image), so it too is the same for any N.
    """
    if batch_size % world_size:
        raise ValueError(f"batch size {batch_size} is not a multiple of the {world_size} ranks")
    n = len(data.train_y)
    sampler = DistributedSampler(range(n), num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
                                 drop_last=True)
    sampler.set_epoch(epoch)
    if data.augment:
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        shifts = torch.randint(0, 2 * CROP_PADDING + 1, (n, 2), generator=g)
        flips = torch.rand(n, generator=g) < 0.5
    for idx in BatchSampler(sampler, batch_size // world_size, drop_last=True):
        x = data.train_x[idx]
        yield (_crop_flip(x, shifts[idx], flips[idx]) if data.augment else x), data.train_y[idx]


def _crop_flip(x: torch.Tensor, shifts: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """Random crops of the zero-padded images (the padding is the normalised 0) and flips."""
    h, w = x.shape[-2:]
    padded = torch.nn.functional.pad(x, (CROP_PADDING,) * 4)
    out = torch.stack([padded[i, :, dy:dy + h, dx:dx + w] for i, (dy, dx) in enumerate(shifts.tolist())])
    return torch.where(flips.view(-1, 1, 1, 1), out.flip(-1), out)


def num_batches(n: int, batch_size: int) -> int:
    return n // batch_size
