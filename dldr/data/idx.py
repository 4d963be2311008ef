"""The MNIST family (MNIST, Fashion-MNIST, KMNIST) from its IDX files, gzipped or raw.

A folder holds the four files of the official split, ``train-images-idx3-ubyte``,
``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte``, each
with or without ``.gz``. torchvision's reader (``read_sn3_pascalvincent_tensor``) opens only
uncompressed files and reports a bad one by an AssertionError or a failed ``view``, so this
module reads the format itself: a header of magic number and sizes, then the raw bytes. Every
size is checked against the header before anything is allocated, so a truncated, mislabelled or
mismatched file ends in one line that names it.
"""
from __future__ import annotations

import gzip
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dldr.errors import DldrError

# magic number of an IDX file of unsigned bytes: 0x00 0x00, type 0x08, then the number of dimensions
IMAGES_MAGIC, LABELS_MAGIC = 0x00000803, 0x00000801
# no file of the family comes near this (EMNIST ByClass: 0.55 GB); a header that claims more is damaged
MAX_BYTES = 2**31
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


@dataclass(frozen=True)
class Layout:
    title: str
    num_classes: int
    get: str  # how to get the files, for the error that finds them missing
    default_root: str | None = None


FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
LAYOUTS = {
    "mnist": Layout("MNIST", 10, "download the four IDX files of MNIST (e.g. from a torchvision or Keras mirror) "
                                 "into the folder"),
    "fashion-mnist": Layout("Fashion-MNIST", 10, "`sudo apt-get install dataset-fashion-mnist` puts them in "
                                                 f"{FASHION_MNIST_ROOT}, or download them from "
                                                 "https://github.com/zalandoresearch/fashion-mnist",
                            FASHION_MNIST_ROOT),
    "kmnist": Layout("KMNIST", 10, "download the four IDX files of KMNIST from "
                                   "https://github.com/rois-codh/kmnist into the folder"),
}


def root_of(kind: str, root: str) -> str:
    """The folder of ``kind``: ``root``, or the set's default folder when ``root`` is empty."""
    layout = LAYOUTS[kind]
    if root:
        return root
    if layout.default_root is None:
        raise DldrError(f"{kind} needs the folder of its IDX files: --data {kind}:DIR; {layout.get}")
    if not Path(layout.default_root).is_dir():
        raise DldrError(f"no {layout.title} at {layout.default_root}; {layout.get}, or give {kind}:DIR")
    return layout.default_root


def read(kind: str, root: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train images N x H x W uint8, train labels int64, test images, test labels) of the folder ``root``."""
    layout = LAYOUTS[kind]
    if not Path(root).is_dir():
        raise DldrError(f"no folder {root} for {kind}:{root}; {layout.get}")
    out = []
    for split in ("train", "test"):
        image_file, label_file = (_find(root, name, layout) for name in FILES[split])
        images, labels = _read(image_file, IMAGES_MAGIC, 3), _read(label_file, LABELS_MAGIC, 1)
        if len(images) != len(labels):
            raise DldrError(f"{image_file} holds {len(images)} images but {label_file} holds {len(labels)} labels; "
                            f"the two files come from different sets or one is damaged: {layout.get}")
        if len(labels) and labels.max() >= layout.num_classes:
            raise DldrError(f"{label_file} holds label {labels.max()}, but {layout.title} has "
                            f"{layout.num_classes} classes; {layout.get}")
        out += [images, labels.astype(np.int64)]
    return tuple(out)


def _find(root: str, name: str, layout: Layout) -> Path:
    for candidate in (Path(root) / f"{name}.gz", Path(root) / name):
        if candidate.is_file():
            return candidate
    raise DldrError(f"{Path(root) / name}(.gz) is missing; {layout.get}")


def _read(path: Path, magic: int, ndim: int) -> np.ndarray:
    """The array of the IDX file ``path``, which must be unsigned bytes with ``ndim`` dimensions."""
    what = "image" if ndim == 3 else "label"
    try:
        with open(path, "rb") as raw:
            zipped = raw.read(2) == b"\x1f\x8b"
            raw.seek(0)
            f = gzip.GzipFile(fileobj=raw, mode="rb") if zipped else raw
            head = f.read(4 + 4 * ndim)
            if len(head) < 4 or struct.unpack(">I", head[:4])[0] != magic:
                found = f"0x{struct.unpack('>I', head[:4])[0]:08x}" if len(head) >= 4 else "none"
                raise DldrError(f"{path} is not an IDX {what} file (magic number {found}, not 0x{magic:08x}); "
                                f"give the {what} file of the set, as downloaded")
            if len(head) < 4 + 4 * ndim:
                raise DldrError(f"{path} is truncated inside its header; download it again")
            shape = struct.unpack(f">{ndim}I", head[4:])
            size = int(np.prod(shape, dtype=np.int64))
            if size > MAX_BYTES:
                raise DldrError(f"{path} claims {'x'.join(map(str, shape))} bytes, more than any IDX file of the "
                                "MNIST family; download it again")
            held = os.fstat(raw.fileno()).st_size - len(head) if not zipped else None
            if held is None or held == size:  # a raw file's size is known before reading it
                body = np.empty(shape, dtype=np.uint8)
                held = f.readinto(memoryview(body).cast("B")) + len(f.read(1))
    except (EOFError, OSError, zlib.error) as e:  # gzip's errors on a cut or damaged stream
        reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
        raise DldrError(f"{path} cannot be read ({reason}); the file is truncated or damaged: download it again") \
            from None
    shown = f"{size} ({'x'.join(map(str, shape))})"
    if held < size:
        raise DldrError(f"{path} is truncated: it holds {held} bytes of {what}s where its header promises {shown}; "
                        "download it again")
    if held > size:
        raise DldrError(f"{path} holds more bytes than its header promises, {shown}; the file is damaged: "
                        "download it again")
    return body
