"""Data sets as in-memory tensors, seeded label noise, and the epoch's mini-batches.

``digits`` is scikit-learn's bundled 8x8 handwritten digits (real data, no download), split
into train and test with a fixed seed so every run sees the same split. ``synthetic:CxHxW:K``
is seeded noise with random labels of any shape, for tests and throughput.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import BatchSampler, DistributedSampler

from dldr.errors import DldrError

SPLIT_SEED = 0
DIGITS_TEST_FRACTION = 0.2
SYNTHETIC_SIZES = (512, 128)


@dataclass
class Dataset:
    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train_x.shape[1:])


def load(spec: str, label_noise: float = 0.0, seed: int = 0) -> Dataset:
    name, _, args = spec.partition(":")
    if name == "digits" and not args:
        data = _digits()
    elif name == "synthetic":
        data = _synthetic(args)
    else:
        raise DldrError(f"unknown data set {spec!r}; use digits or synthetic[:CxHxW:K]")
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


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int, epoch: int,
            rank: int = 0, world_size: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's part of the epoch's shuffled global mini-batches; the ragged tail is dropped.

    A ``DistributedSampler`` deals rank r every world_size-th index of one seeded permutation,
    so at each step the ranks' batches of batch_size / world_size together hold exactly the
    global batch a single process would draw: N = 1 and N = 2 follow the same trajectory.
    """
    if batch_size % world_size:
        raise ValueError(f"batch size {batch_size} is not a multiple of the {world_size} ranks")
    sampler = DistributedSampler(range(len(y)), num_replicas=world_size, rank=rank, shuffle=True,
                                 seed=seed, drop_last=True)
    sampler.set_epoch(epoch)
    for idx in BatchSampler(sampler, batch_size // world_size, drop_last=True):
        yield x[idx], y[idx]


def num_batches(n: int, batch_size: int) -> int:
    return n // batch_size
