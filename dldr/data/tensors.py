"""Data sets small enough to hold in memory as raw pixel tensors: digits, MNIST family, CIFAR, synthetic.

Images stay in their raw integer form (a quarter of the memory of floats) and are normalised
per batch. ``digits`` is scikit-learn's bundled 8x8 handwritten digits (real data, no download),
split into train and test with a fixed seed so every run sees the same split. ``mnist:DIR``,
``fashion-mnist[:DIR]`` and ``kmnist:DIR`` read the IDX files of the official split
(``dldr.data.idx``), normalised with the training images' own mean and deviation. ``cifar10:DIR`` and
``cifar100:DIR`` read the python-version CIFAR folders (``dldr.data.cifar``), normalised per
channel with CIFAR's own statistics and augmented with the standard 4-pixel random crop and
horizontal flip. ``synthetic:CxHxW:K[:N]`` is seeded random pixels with random labels of any shape
(N training images and N/4 test images; 512 and 128 by default), for tests, throughput and memory.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from dldr.data import cifar, idx
from dldr.data.source import (
    CROP_PADDING,
    Batch,
    DataSource,
    Stats,
    epoch_batches,
    image_seed,
)
from dldr.errors import DldrError

SPLIT_SEED = 0
DIGITS_TEST_FRACTION = 0.2
SYNTHETIC_SIZES = (512, 128)
# uint8 images of every synthetic split together: a typo in CxHxW must not ask for a terabyte
SYNTHETIC_MAX_BYTES = 4 << 30
# per-channel mean and standard deviation of each CIFAR training set
CIFAR_STATS = {
    "cifar10": Stats((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": Stats((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
UNIFORM_STATS = Stats((0.5,), (12 ** -0.5,))  # of uniform pixels in [0, 1]


@dataclass
class TensorSource(DataSource):
    name: str
    train_x: torch.Tensor  # N x C x H x W raw pixels, ``scale`` being white
    train_labels: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    stats: Stats
    scale: float = 255.0
    augmentation: str = "none"  # or "crop_flip"
    val_x: torch.Tensor | None = None
    val_y: torch.Tensor | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train_x.shape[1:])

    def _train_images(self, per_rank: int, seed: int, epoch: int, rank: int, world_size: int) -> Iterator[Batch]:
        for index in epoch_batches(len(self.train_labels), per_rank, seed, epoch, rank, world_size):
            x = self.stats.normalise(self.train_x[index], self.scale)
            if self.augmentation == "crop_flip":
                x = torch.stack([_crop_flip(image, image_seed(seed, epoch, i)) for image, i in zip(x, index)])
            yield x, torch.tensor(index)

    def test_batches(self, batch_size: int, rank: int = 0, world_size: int = 1) -> Iterator[Batch]:
        return self._eval_batches(self.test_x, self.test_y, batch_size, rank, world_size)

    def hold_out(self, fraction: float, seed: int) -> None:
        order = torch.randperm(len(self.train_labels), generator=torch.Generator().manual_seed(seed))
        n_val = round(fraction * len(order))
        if not 0 < n_val < len(order):
            raise DldrError(f"--holdout {fraction} of {len(order)} training images leaves no validation "
                            "or no training image; pick a fraction in between")
        val, train = order[:n_val].sort().values, order[n_val:].sort().values
        self.val_x, self.val_y = self.train_x[val], self.train_labels[val]
        self.train_x, self.train_labels = self.train_x[train], self.train_labels[train]

    def val_batches(self, batch_size: int, rank: int = 0, world_size: int = 1) -> Iterator[Batch]:
        if self.val_y is None:
            return super().val_batches(batch_size, rank, world_size)
        return self._eval_batches(self.val_x, self.val_y, batch_size, rank, world_size)

    def _eval_batches(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, rank: int,
                      world_size: int) -> Iterator[Batch]:
        x, y = x[rank::world_size], y[rank::world_size]
        for start in range(0, len(y), batch_size):
            yield self.stats.normalise(x[start:start + batch_size], self.scale), y[start:start + batch_size]

    def raw(self, split: str) -> Sequence[tuple[np.ndarray, int]]:
        x, y = (self.train_x, self.train_labels) if split == "train" else (self.test_x, self.test_y)
        pixels = (x.float() * (255.0 / self.scale)).round().clamp(0, 255).to(torch.uint8)
        return _RawImages(pixels.expand(-1, 3, -1, -1) if pixels.shape[1] == 1 else pixels, y)


@dataclass
class _RawImages:
    """Indexable H x W x 3 images and labels; picklable, for ffcv's writer processes."""
    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        return np.ascontiguousarray(self.x[i].permute(1, 2, 0).numpy()), int(self.y[i])


def _crop_flip(image: torch.Tensor, seed: int) -> torch.Tensor:
    """A random crop of the zero-padded image (the padding is the normalised 0) and a random flip."""
    g = torch.Generator().manual_seed(seed)
    dy, dx = torch.randint(0, 2 * CROP_PADDING + 1, (2,), generator=g).tolist()
    h, w = image.shape[-2:]
    out = torch.nn.functional.pad(image, (CROP_PADDING,) * 4)[:, dy:dy + h, dx:dx + w]
    return out.flip(-1) if torch.rand(1, generator=g) < 0.5 else out


def digits() -> TensorSource:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.uint8).unsqueeze(1)  # values 0..16
    y = torch.tensor(bunch.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(SPLIT_SEED))
    n_test = round(DIGITS_TEST_FRACTION * len(y))
    test, train = order[:n_test], order[n_test:]
    scaled = x[train].float() / 16.0
    stats = Stats((float(scaled.mean()),), (float(scaled.std()),))
    return TensorSource("digits", x[train], y[train], x[test], y[test], 10, stats, scale=16.0)


def idx_folder(kind: str, root: str) -> TensorSource:
    """An MNIST-family set: 1 x H x W images of the fixed official train/test split."""
    train_x, train_y, test_x, test_y = (torch.from_numpy(a) for a in idx.read(kind, idx.root_of(kind, root)))
    scaled = train_x.float().div_(255.0)
    stats = Stats((float(scaled.mean()),), (float(scaled.std()),))
    return TensorSource(kind, train_x.unsqueeze(1), train_y, test_x.unsqueeze(1), test_y,
                        idx.LAYOUTS[kind].num_classes, stats)


def cifar_folder(kind: str, root: str) -> TensorSource:
    train_x, train_y, test_x, test_y, classes = cifar.read(kind, root)
    return TensorSource(kind, torch.from_numpy(train_x), torch.from_numpy(train_y), torch.from_numpy(test_x),
                        torch.from_numpy(test_y), classes, CIFAR_STATS[kind], augmentation="crop_flip")


def synthetic(args: str) -> TensorSource:
    shape_text, _, rest = (args or "3x32x32:10").partition(":")
    classes_text, _, count_text = rest.partition(":")
    try:
        shape = tuple(int(s) for s in shape_text.split("x"))
        num_classes = int(classes_text or 10)
        train = int(count_text) if count_text else SYNTHETIC_SIZES[0]
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1 or num_classes < 2 or train < 1:
        raise DldrError(f"synthetic data is synthetic:CxHxW:K[:N] (e.g. synthetic:3x32x32:10, or "
                        f"synthetic:3x224x224:10:80 for 80 training images), got synthetic:{args}")
    sizes = (train, max(1, train * SYNTHETIC_SIZES[1] // SYNTHETIC_SIZES[0])) if count_text else SYNTHETIC_SIZES
    need = sum(sizes) * int(np.prod(shape, dtype=object))
    if need > SYNTHETIC_MAX_BYTES:
        raise DldrError(f"synthetic:{args} needs {need / 2**30:.1f} GiB of images, more than the "
                        f"{SYNTHETIC_MAX_BYTES / 2**30:.0f} GiB synthetic data may take; choose a smaller CxHxW or N")
    g = torch.Generator().manual_seed(SPLIT_SEED)
    n = sum(sizes)
    x = torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.uint8)
    y = torch.randint(num_classes, (n,), generator=g)
    k = sizes[0]
    stats = Stats(UNIFORM_STATS.mean * shape[0], UNIFORM_STATS.std * shape[0])
    name = f"synthetic:{shape_text}:{num_classes}" + (f":{train}" if count_text else "")
    return TensorSource(name, x[:k], y[:k], x[k:], y[k:], num_classes, stats)
