"""ImageFolder data in the ImageNet layout (ROOT/train/CLASS/*.jpg, ROOT/val/CLASS/*.jpg), decoded
by torchvision in DataLoader worker processes.

Training images get the standard random-resized crop to ``image_size`` and a horizontal flip;
test images are resized to image_size / 0.875 and centre-cropped (256 -> 224). Each image's
augmentation is seeded by (seed, epoch, image), so 1 and N ranks, and any number of loader
workers, see the same pixels.
"""
from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset
from torchvision.transforms import v2

from dldr.data.source import (
    CENTRE_CROP,
    IMAGENET_STATS,
    Batch,
    DataSource,
    Stats,
    epoch_batches,
    image_seed,
)
from dldr.errors import DldrError

LAYOUT = "ImageFolder data is ROOT/train/CLASS/IMAGE and ROOT/val/CLASS/IMAGE"


@dataclass
class _Images(torch.utils.data.Dataset):
    """Decodes and transforms one image per key (index, augmentation seed); picklable for workers."""
    samples: list[tuple[str, int]]
    transform: v2.Transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, seed = key
        image = _rgb(self.samples[index][0])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.transform(image), index


class ImageFolderSource(DataSource):
    augmentation = "resized_crop"

    def __init__(self, root: str, image_size: int = 224, loader_workers: int = 2):
        base = Path(root)
        train_dir, val_dir = base / "train", base / "val"
        for folder in (train_dir, val_dir):
            if not folder.is_dir():
                raise DldrError(f"no {folder.name}/ folder in {root}; {LAYOUT}")
        classes = sorted(entry.name for entry in os.scandir(train_dir) if entry.is_dir())
        extra = sorted({entry.name for entry in os.scandir(val_dir) if entry.is_dir()} - set(classes))
        if extra:
            raise DldrError(f"{val_dir} has classes that {train_dir} lacks ({', '.join(extra[:3])}); "
                            "give val/ the class folders of train/")
        class_to_idx = {c: i for i, c in enumerate(classes)}
        self.train_samples = self._samples(train_dir, class_to_idx)
        self.val_samples = self._samples(val_dir, class_to_idx)
        if len(classes) < 2:
            raise DldrError(f"{train_dir} has {len(classes)} class folder(s); a classifier needs at least 2")
        self.name = f"imagefolder:{base.name}"
        self.classes = classes
        self.num_classes = len(classes)
        self.input_shape = (3, image_size, image_size)
        self.train_labels = torch.tensor([label for _, label in self.train_samples])
        self.test_labels = torch.tensor([label for _, label in self.val_samples])
        self.stats = Stats(*IMAGENET_STATS)
        self.loader_workers = loader_workers
        normalise = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(*IMAGENET_STATS)]
        self.train_transform = v2.Compose([v2.RandomResizedCrop(image_size, antialias=True),
                                           v2.RandomHorizontalFlip(), *normalise])
        self.test_transform = v2.Compose([v2.Resize(round(image_size / CENTRE_CROP), antialias=True),
                                          v2.CenterCrop(image_size), *normalise])

    @staticmethod
    def _samples(folder: Path, class_to_idx: dict[str, int]) -> list[tuple[str, int]]:
        samples = make_dataset(str(folder), class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
        if not samples:
            raise DldrError(f"no images in {folder}; {LAYOUT} ({', '.join(IMG_EXTENSIONS[:4])}, ...)")
        return samples

    def identity(self) -> dict:
        return {**super().identity(), "classes": self.classes}

    def _load(self, samples: list[tuple[str, int]], transform: v2.Transform,
              keys: Iterator[list[tuple[int, int]]]) -> Iterator[Batch]:
        loader = DataLoader(_Images(samples, transform), batch_sampler=keys, num_workers=self.loader_workers,
                            pin_memory=torch.cuda.is_available())
        try:
            yield from loader
        except DldrError as e:  # raised in a worker, it arrives with the worker's traceback
            prefix = f"{DldrError.__module__}.{DldrError.__name__}: "
            raise DldrError(str(e).strip().splitlines()[-1].removeprefix(prefix)) from None

    def _train_images(self, per_rank: int, seed: int, epoch: int, rank: int, world_size: int) -> Iterator[Batch]:
        keys = ([(i, image_seed(seed, epoch, i)) for i in index] for index in
                epoch_batches(len(self.train_samples), per_rank, seed, epoch, rank, world_size))
        return self._load(self.train_samples, self.train_transform, keys)

    def test_batches(self, batch_size: int, rank: int = 0, world_size: int = 1) -> Iterator[Batch]:
        mine = range(rank, len(self.val_samples), world_size)
        keys = ([(i, 0) for i in mine[start:start + batch_size]] for start in range(0, len(mine), batch_size))
        for x, index in self._load(self.val_samples, self.test_transform, keys):
            yield x, self.test_labels[index]

    def raw(self, split: str) -> Sequence[tuple[np.ndarray, int]]:
        return _Decoded(self.train_samples if split == "train" else self.val_samples)


@dataclass
class _Decoded:
    """The undecorated RGB pixels of each image, for ``dldr data convert``."""
    samples: list[tuple[str, int]]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        path, label = self.samples[i]
        return np.asarray(_rgb(path)), label


def _rgb(path: str) -> Image.Image:
    try:
        with Image.open(path) as f:
            return f.convert("RGB")
    except OSError as e:
        raise DldrError(f"cannot read image {path} ({e}); remove or replace it") from None
