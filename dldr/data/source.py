"""What every data set gives the phases: its shape, its labels, and each rank's share of a batch."""
from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import BatchSampler, DistributedSampler

from dldr.errors import DldrError

Batch = tuple[torch.Tensor, torch.Tensor]
# The training augmentations dldr knows, by the name a .beton's card records:
# none; a random crop of the image padded by CROP_PADDING plus a horizontal flip (CIFAR);
# a random-resized crop to the image size plus a flip, tested on a resize and centre crop (ImageNet).
AUGMENTATIONS = ("none", "crop_flip", "resized_crop")
CROP_PADDING = 4
# eval resizes to image_size / CENTRE_CROP, then crops the centre (256 -> 224)
CENTRE_CROP = 224 / 256
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@dataclass
class Stats:
    """Per-channel mean and standard deviation of pixel values scaled to [0, 1]."""
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def normalise(self, x: torch.Tensor, scale: float) -> torch.Tensor:
        shape = (1, -1, 1, 1)
        return (x.float() / scale - torch.tensor(self.mean).view(shape)) / torch.tensor(self.std).view(shape)


class DataSource(ABC):
    """A labelled image data set that deals each rank its share of every global mini-batch.

    ``train_labels`` are the labels training uses: label noise replaces them, and every source
    looks a batch's labels up there by image index, so noisy labels reach every loader alike.
    """

    name: str
    num_classes: int
    input_shape: tuple[int, ...]
    train_labels: torch.Tensor
    augmentation: str
    stats: Stats

    def steps(self, batch_size: int, world_size: int = 1) -> int:
        """Optimizer steps per epoch; the ragged tail of the epoch is dropped."""
        return len(self.train_labels) // batch_size

    def train_batches(self, batch_size: int, seed: int, epoch: int, rank: int = 0,
                      world_size: int = 1) -> Iterator[Batch]:
        """This rank's batch_size / world_size images of each of the epoch's global batches."""
        if batch_size % world_size:
            raise ValueError(f"batch size {batch_size} is not a multiple of the {world_size} ranks")
        for x, index in self._train_images(batch_size // world_size, seed, epoch, rank, world_size):
            yield x, self.train_labels[index]

    @abstractmethod
    def _train_images(self, per_rank: int, seed: int, epoch: int, rank: int,
                      world_size: int) -> Iterator[Batch]:
        """(augmented, normalised images, their indices) of this rank's batches of the epoch."""

    @abstractmethod
    def test_batches(self, batch_size: int, rank: int = 0, world_size: int = 1) -> Iterator[Batch]:
        """Every world_size-th test image from ``rank`` on, so the ranks together see each once."""

    def hold_out(self, fraction: float, seed: int) -> None:
        """Move a seeded ``fraction`` of the training images, with their labels, to a validation set."""
        raise DldrError(f"--holdout needs a data set held in memory (digits, cifar10:DIR, cifar100:DIR, "
                        f"synthetic); {self.name} is read from disk: hold out a folder of it instead")

    def val_batches(self, batch_size: int, rank: int = 0, world_size: int = 1) -> Iterator[Batch]:
        """Like ``test_batches``, over the images ``hold_out`` set aside."""
        raise DldrError(f"{self.name} has no validation set; give --holdout")

    def raw(self, split: str) -> Sequence[tuple[np.ndarray, int]]:
        """(H x W x 3 uint8 image, label) of a split, for ``dldr data convert``."""
        raise DldrError(f"{self.name} is already converted; convert the data set it was written from")

    def identity(self) -> dict:
        """What names the data set, for a converted file's card: two splits must agree on it."""
        return {"source": self.name, "num_classes": self.num_classes}


def epoch_batches(n: int, per_rank: int, seed: int, epoch: int, rank: int, world_size: int) -> Iterator[list[int]]:
    """This rank's index lists of the epoch's shuffled global batches, ragged tail dropped.

    A ``DistributedSampler`` deals rank r every world_size-th index of one seeded permutation,
    so at each step the ranks' lists together hold exactly the global batch one process would
    draw: 1 and N ranks follow the same trajectory.
    """
    sampler = DistributedSampler(range(n), num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
                                 drop_last=True)
    sampler.set_epoch(epoch)
    return iter(BatchSampler(sampler, per_rank, drop_last=True))


def image_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of one image's augmentation: the same for any number of ranks or loader workers."""
    return ((seed * 1_000_003 + epoch) * 10_000_019 + index) % 2**63  # any seed fits torch.manual_seed


def noisy_labels(labels: torch.Tensor, fraction: float, num_classes: int, seed: int) -> torch.Tensor:
    """Replace a seeded ``fraction`` of labels by a class drawn uniformly from all ``num_classes``."""
    g = torch.Generator().manual_seed(seed)
    flip = torch.rand(len(labels), generator=g) < fraction
    drawn = torch.randint(num_classes, (len(labels),), generator=g)
    return torch.where(flip, drawn, labels)


def labels_sha256(labels: np.ndarray | torch.Tensor) -> str:
    return hashlib.sha256(np.ascontiguousarray(np.asarray(labels), dtype=np.int64).tobytes()).hexdigest()
