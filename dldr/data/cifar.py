"""CIFAR-10/100 from the standard python-version directories, read without trusting the files.

The batches are pickles. They are read with an unpickler that only rebuilds dicts, lists,
strings, bytes and plain numpy arrays (no other callable can be named by the file), and their
structure is checked instead of an md5, so files generated for tests read like the real ones.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from dldr.errors import DldrError

# folder name, training files, test file, label key, classes
LAYOUTS = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch", b"labels", 10),
    "cifar100": ("cifar-100-python", ["train"], "test", b"fine_labels", 100),
}
# The only globals a CIFAR batch needs: numpy's array reconstruction, and the bytes decoding
# of protocol-2 pickles written by Python 3.
_ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a CIFAR batch")
        found = super().find_class(module, name)
        return _empty_first(found) if name == "_reconstruct" else found


def _empty_first(reconstruct):
    """numpy's ``_reconstruct`` made to start from an empty array whatever shape the file asks for: the
    array's real shape comes with its data, which numpy checks against it, so a file cannot make the
    reader allocate more than it holds."""
    def empty(subtype: type, shape: object, dtype: object) -> np.ndarray:
        return reconstruct(subtype, (0,), dtype)
    return empty


def folder(kind: str, root: str) -> Path:
    """The data set's folder: ``root`` itself, or its standard subfolder."""
    name = LAYOUTS[kind][0]
    path = Path(root)
    return path if path.name == name else path / name


def read(kind: str, root: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """(train images N x 3 x 32 x 32 uint8, train labels, test images, test labels, classes)."""
    name, train_files, test_file, label_key, classes = LAYOUTS[kind]
    base = folder(kind, root)
    if not base.is_dir():
        raise DldrError(f"no {name}/ folder at {root}; download the python version of {kind.upper()} from "
                        f"https://www.cs.toronto.edu/~kriz/cifar.html and unpack it there")
    train = [_batch(base / f, label_key, classes) for f in train_files]
    test_x, test_y = _batch(base / test_file, label_key, classes)
    return (np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train]), test_x, test_y, classes)


def _batch(path: Path, label_key: bytes, classes: int) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise DldrError(f"{path} is missing; unpack the whole python version of CIFAR into {path.parent}")
    try:
        with open(path, "rb") as f:
            batch = _ArrayUnpickler(f, encoding="bytes").load()
        data, labels = np.asarray(batch[b"data"]), np.asarray(batch[label_key], dtype=np.int64)
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError, MemoryError) as e:
        raise DldrError(f"{path} is not a CIFAR batch ({e}); unpack the python version of CIFAR again") from None
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or labels.shape != (len(data),) \
            or labels.min(initial=0) < 0 or labels.max(initial=0) >= classes:
        raise DldrError(f"{path} is not a CIFAR batch (images {data.dtype} {data.shape}, {labels.shape} labels); "
                        "unpack the python version of CIFAR again")
    return data.reshape(-1, 3, 32, 32), labels
