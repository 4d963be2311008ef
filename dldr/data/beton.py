"""ffcv .beton files: ``dldr data convert`` writes one split of any data set, ``ffcv:TRAIN,VAL`` reads it.

A .beton written here holds the fields image (RGB), label and index, and beside it a card
``OUT.beton.json`` that names the data set, the split, its augmentation and normalisation and
the checksum of its labels. Reading checks the files against their cards, so a .beton of another
data set, or a train and a val file of two data sets, is refused instead of trained on.

Labels are looked up by the index field in the source's ``train_labels``, so label noise works
as with every other loader. The pipelines decode, flip, translate and normalise in ffcv's
compiled code and only then convert to torch: ffcv 1.0.2 hangs forever on a pipeline that goes
compiled -> torch -> compiled (ffcv issue #396), as decoder, flip, ToTensor, ToTorchImage,
NormalizeImage would on CPU.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dldr.data.source import (
    AUGMENTATIONS,
    CENTRE_CROP,
    CROP_PADDING,
    Batch,
    DataSource,
    Stats,
    labels_sha256,
)
from dldr.errors import DldrError

FIELDS = ("image", "label", "index")
CARD_FORMAT = "dldr-beton/1"
INSTALL = ("install it with `pip install -e \".[ffcv]\"` after the system libraries libopencv-dev, "
           "libturbojpeg0-dev and pkg-config (see the README)")


def _require_ffcv() -> None:
    try:
        import ffcv  # noqa: F401
    except ImportError as e:
        raise DldrError(f"the ffcv loader is not installed ({e}); {INSTALL}") from None


def card_path(beton: str | Path) -> Path:
    return Path(f"{beton}.json")


class _Indexed:
    """(image, label, index) for ffcv's writer processes."""

    def __init__(self, raw):
        self.raw = raw

    def __len__(self) -> int:
        return len(self.raw)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int, int]:
        image, label = self.raw[i]
        return image, label, i


def convert(source: DataSource, split: str, out: str, max_resolution: int = 256, jpeg: bool = False,
            workers: int = 2) -> dict[str, Any]:
    """Write ``split`` of ``source`` to the .beton ``out`` and its card; returns the card."""
    _require_ffcv()
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    target = Path(out)
    if target.exists() or card_path(target).exists():
        raise DldrError(f"{out} already exists; remove it and {card_path(target).name}, or choose another path")
    if not target.parent.is_dir():
        raise DldrError(f"no folder {target.parent} to write {target.name} into; create it first")
    raw = source.raw(split)
    fixed_size = source.augmentation != "resized_crop"  # small fixed-size images are kept as they are
    image = RGBImageField(write_mode="jpg" if jpeg else "raw", max_resolution=None if fixed_size else max_resolution)
    partial = target.with_name(f".{target.name}.partial")
    try:
        DatasetWriter(str(partial), {"image": image, "label": IntField(), "index": IntField()},
                      num_workers=max(workers, 1)).from_indexed_dataset(_Indexed(raw))
        labels = _read_fields(partial)
        card = {"format": CARD_FORMAT, **source.identity(), "split": split, "samples": len(labels),
                "labels_sha256": labels_sha256(labels), "augmentation": source.augmentation,
                "mean": list(source.stats.mean) * (3 // len(source.stats.mean)),
                "std": list(source.stats.std) * (3 // len(source.stats.std)),
                "image_size": list(source.input_shape[1:]) if fixed_size else None}
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    card_path(target).write_text(json.dumps(card, indent=1) + "\n")
    return card


def _read_fields(path: Path) -> np.ndarray:
    """The labels of a .beton with dldr's fields, checking that its index field counts 0, 1, ..."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.reader import Reader

    try:
        reader = Reader(str(path))
    except Exception as e:  # noqa: BLE001  (ffcv raises what numpy and struct raise on other files)
        raise DldrError(f"{path} is not a .beton file ({type(e).__name__}); write one with `dldr data convert`") from None
    kinds = {name: type(handler) for name, handler in reader.handlers.items()}
    if kinds != {"image": RGBImageField, "label": IntField, "index": IntField}:
        raise DldrError(f"{path} has the fields {', '.join(kinds)}, not {', '.join(FIELDS)}; "
                        "write it with `dldr data convert`")
    columns = {name: reader.metadata[f"f{i}"] for i, name in enumerate(reader.handlers)}
    if not np.array_equal(columns["index"], np.arange(reader.num_samples)):
        raise DldrError(f"{path} is not a .beton written by `dldr data convert` (its index field is out of order)")
    return np.array(columns["label"], dtype=np.int64)  # a copy: the reader maps the file read-only


def _card(path: str, split: str) -> tuple[dict[str, Any], np.ndarray]:
    """The card of the .beton at ``path`` and the file's labels, checked against each other."""
    beton, card_file = Path(path), card_path(path)
    if not beton.is_file():
        raise DldrError(f"no .beton file at {path}; write one with `dldr data convert SRC {path} --split {split}`")
    try:
        card = json.loads(card_file.read_text())
        ok = card.get("format") == CARD_FORMAT and card.get("augmentation") in AUGMENTATIONS
    except (OSError, ValueError, AttributeError):
        ok = False
    if not ok:
        raise DldrError(f"{path} has no valid card {card_file.name} beside it; "
                        f"write the .beton with `dldr data convert SRC {path} --split {split}`")
    if card["split"] != split:
        raise DldrError(f"{path} holds the {card['split']} split where the {split} split belongs; "
                        "give ffcv:TRAIN.beton,VAL.beton")
    labels = _read_fields(beton)
    if labels_sha256(labels) != card["labels_sha256"]:
        raise DldrError(f"{path} does not hold the labels its card {card_file.name} records (a .beton of "
                        "another data set?); convert the data set again with `dldr data convert`")
    return card, labels


class BetonSource(DataSource):
    def __init__(self, args: str, image_size: int = 224, loader_workers: int = 2):
        paths = args.split(",")
        if len(paths) != 2 or not all(paths):
            raise DldrError(f"ffcv data is ffcv:TRAIN.beton,VAL.beton, got ffcv:{args}")
        _require_ffcv()
        self.paths = paths
        (train, train_labels), (val, test_labels) = _card(paths[0], "train"), _card(paths[1], "val")
        identity = ("source", "num_classes", "classes")
        if any(train.get(k) != val.get(k) for k in identity):
            raise DldrError(f"{paths[0]} ({train['source']}) and {paths[1]} ({val['source']}) come from different "
                            "data sets; convert the train and val split of one data set")
        self.name = f"ffcv:{train['source']}"
        self.num_classes = train["num_classes"]
        self.augmentation = train["augmentation"]
        self.stats = Stats(tuple(train["mean"]), tuple(train["std"]))
        self.input_shape = (3, *(train["image_size"] or (image_size, image_size)))
        self.train_labels = torch.from_numpy(train_labels)
        self.test_labels = torch.from_numpy(test_labels)
        self.loader_workers = max(loader_workers, 1)
        self._loaders: dict[tuple, Any] = {}

    def steps(self, batch_size: int, world_size: int = 1) -> int:
        """As ffcv deals it: with ranks, each gets ceil(n / ranks) indices (its sampler pads)."""
        n = len(self.train_labels)
        return (-(-n // world_size)) // (batch_size // world_size) if world_size > 1 else n // batch_size

    def _pipeline(self, train: bool) -> list:
        from ffcv.fields.decoders import (
            CenterCropRGBImageDecoder,
            RandomResizedCropRGBImageDecoder,
            SimpleRGBImageDecoder,
        )
        from ffcv.transforms import (
            NormalizeImage,
            RandomHorizontalFlip,
            RandomTranslate,
            ToTensor,
            ToTorchImage,
        )

        mean, std = np.array(self.stats.mean) * 255, np.array(self.stats.std) * 255
        size = self.input_shape[1:]
        if self.augmentation == "resized_crop":
            ops = [RandomResizedCropRGBImageDecoder(size) if train else CenterCropRGBImageDecoder(size, CENTRE_CROP)]
        else:
            ops = [SimpleRGBImageDecoder()]
        if train and self.augmentation != "none":
            ops.append(RandomHorizontalFlip())
        if train and self.augmentation == "crop_flip":
            ops.append(RandomTranslate(padding=CROP_PADDING, fill=tuple(int(v) for v in mean.round())))
        # every compiled operation before the first torch one (ffcv issue #396)
        return [*ops, NormalizeImage(mean, std, np.float32), ToTensor(), ToTorchImage()]

    def _loader(self, train: bool, batch_size: int, seed: int, rank: int, world_size: int):
        """One ffcv Loader per use, kept: building one compiles its pipeline."""
        key = (train, batch_size, seed, rank, world_size)
        if key not in self._loaders:
            from ffcv.fields.decoders import IntDecoder
            from ffcv.loader import Loader, OrderOption
            from ffcv.transforms import Squeeze, ToTensor

            pipelines = {"image": self._pipeline(train), "label": None, "index": [IntDecoder(), ToTensor(), Squeeze(1)]}
            if train:
                self._loaders[key] = Loader(self.paths[0], batch_size=batch_size, num_workers=self.loader_workers,
                                            order=OrderOption.RANDOM, distributed=world_size > 1, seed=seed,
                                            drop_last=True, pipelines=pipelines)
            else:
                self._loaders[key] = Loader(self.paths[1], batch_size=batch_size, num_workers=self.loader_workers,
                                            order=OrderOption.SEQUENTIAL, drop_last=False, pipelines=pipelines,
                                            indices=np.arange(rank, len(self.test_labels), world_size))
        return self._loaders[key]

    def _train_images(self, per_rank: int, seed: int, epoch: int, rank: int, world_size: int) -> Iterator[Batch]:
        loader = self._loader(True, per_rank, seed, rank, world_size)
        loader.next_epoch = epoch  # the order of an epoch depends only on (seed, epoch), so resumes agree
        for x, index in loader:
            yield x, index.long()

    def test_batches(self, batch_size: int, rank: int = 0, world_size: int = 1) -> Iterator[Batch]:
        for x, index in self._loader(False, batch_size, 0, rank, world_size):
            yield x, self.test_labels[index.long()]
