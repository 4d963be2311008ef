"""Test helpers: trajectories with a known principal subspace, written as phase 1 would; small optimizer
problems; a small run's flags; an S3 server on loopback."""

import contextlib
import re
import socket
import subprocess
import sys
import time

import numpy as np
import torch
from torch import nn

from dldr import phases
from dldr.params import shard_slices
from dldr.store import RunStore, snapshot_path

# a run of digits small enough for many tests: in this process, 3 epochs, d = 8, 2 subspace epochs
SMALL = [
    "--workers",
    "0",
    "--sample-epochs",
    "3",
    "--snapshot-every",
    "1",
    "--dim",
    "8",
    "--subspace-epochs",
    "2",
    "--subspace-batch-size",
    "128",
    "--quiet",
]


# A line Ray's raylet forwards to the driver's stderr about the machine ("... is over 95% full"): Ray's, not dldr's.
RAYLET_LINE = re.compile(r"^(\x1b\[[0-9;]*m)*\(raylet\)")


def stderr_lines(err: str) -> list[str]:
    """A command's own stderr lines, without the raylet's notes about the machine."""
    return [line for line in err.strip().splitlines() if not RAYLET_LINE.match(line)]


def write_trajectory(store: RunStore, trajectory: np.ndarray, num_shards: int) -> None:
    """Write a D x t trajectory as the sharded snapshot files phase 1 would write."""
    dim, steps = trajectory.shape
    for rank, sl in enumerate(shard_slices(dim, num_shards)):
        for step in range(steps):
            store.save_array(snapshot_path(rank, num_shards, step), trajectory[sl, step].astype(np.float32))


def low_rank_trajectory(dim: int = 600, steps: int = 12, rank: int = 8, seed: int = 0) -> np.ndarray:
    """A trajectory whose centred variance decays geometrically over ``rank`` directions, plus a far offset."""
    rng = np.random.default_rng(seed)
    directions = np.linalg.qr(rng.standard_normal((dim, rank)))[0]
    scales = 2.0 ** -np.arange(rank)
    coords = rng.standard_normal((rank, steps)) * scales[:, None]
    return 5.0 + directions @ coords


def largest_principal_angle(a: np.ndarray, b: np.ndarray) -> float:
    """The largest principal angle (radians) between the column spans of ``a`` and ``b``."""
    qa, qb = np.linalg.qr(a.astype(np.float64))[0], np.linalg.qr(b.astype(np.float64))[0]
    cosines = np.linalg.svd(qa.T @ qb, compute_uv=False)
    return float(np.arccos(np.clip(cosines.min(), -1.0, 1.0)))


def write_cifar(root, kind: str = "cifar10", per_file: int = 40, seed: int = 0) -> np.ndarray:
    """A CIFAR folder in the python-version layout with random images; returns the training images."""
    import pickle

    from dldr.data.cifar import LAYOUTS

    name, train_files, test_file, label_key, classes = LAYOUTS[kind]
    folder = root / name
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    images = []
    for file in [*train_files, test_file]:
        data = rng.integers(0, 256, (per_file, 3 * 32 * 32), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, classes, per_file)]
        with open(folder / file, "wb") as f:
            pickle.dump({b"data": data, label_key: labels, b"batch_label": b"generated"}, f, protocol=2)
        images.append(data)
    return np.concatenate(images[:-1]).reshape(-1, 3, 32, 32)


def write_imagefolder(root, classes: int = 3, per_class: tuple[int, int] = (16, 6), seed: int = 0) -> None:
    """An ImageNet-layout folder: train/ and val/ with one folder per class of JPEG and PNG images
    of different sizes, each class tinted its own colour so a model can learn them."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, count in zip(("train", "val"), per_class):
        for k in range(classes):
            folder = root / split / f"class_{k}"
            folder.mkdir(parents=True)
            tint = np.zeros(3)
            tint[k % 3] = 40
            for i in range(count):
                h, w = rng.integers(24, 48, 2)
                pixels = np.clip(rng.normal(100, 50, (h, w, 3)) + tint, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.{'png' if i % 2 else 'jpg'}")


def write_idx_folder(
    root, train: int = 240, test: int = 60, size: int = 28, classes: int = 10, zipped: bool = True, seed: int = 0
) -> dict[str, np.ndarray]:
    """An MNIST-layout folder of IDX files (gzipped or raw) whose images a model can learn: each class
    lights its own square of the image. Returns the arrays written, by file name."""
    import gzip
    import struct

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    written = {}
    for prefix, count in (("train", train), ("t10k", test)):
        labels = rng.integers(0, classes, count).astype(np.uint8)
        images = rng.integers(0, 60, (count, size, size)).astype(np.uint8)
        cell = size // 4
        for i, label in enumerate(labels):
            r, c = divmod(int(label), 4)
            images[i, r * cell : (r + 1) * cell, c * cell : (c + 1) * cell] += 180
        for name, array, magic in (
            (f"{prefix}-images-idx3-ubyte", images, 0x803),
            (f"{prefix}-labels-idx1-ubyte", labels, 0x801),
        ):
            raw = struct.pack(f">I{array.ndim}I", magic, *array.shape) + array.tobytes()
            path = root / (f"{name}.gz" if zipped else name)
            path.write_bytes(gzip.compress(raw) if zipped else raw)
            written[name] = array
    return written


def orthonormal(num_params: int, dim: int, seed: int = 0) -> torch.Tensor:
    """A seeded float64 basis with orthonormal columns."""
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(num_params, dim, generator=g, dtype=torch.float64))[0]


def bn_problem(device: str = "cpu"):
    """A small BatchNorm model on ``device``, a batch (x, y), a float32 basis of 4 directions and the
    parameter count."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).to(device)
    x, y = torch.randn(32, 5).to(device), torch.randint(3, (32,)).to(device)
    num = sum(p.numel() for p in model.parameters())
    return model, x, y, orthonormal(num, 4).float().to(device), num


def model_closure(opt, model, x, y):
    """The closure of a cross-entropy step: the loss, with its gradient unless a line-search trial."""

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        if torch.is_grad_enabled():
            loss.backward()
        return loss

    return closure


class StopAt(phases.Session):
    """Stops the run like Ctrl-C would, after a given optimizer step."""

    def __init__(self, step):
        self.step = step

    def after_step(self, step):
        if step == self.step:
            raise KeyboardInterrupt


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def s3_server():
    """An S3-compatible server (moto's) in a process of its own on 127.0.0.1; yields its endpoint URL."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the S3 server did not start (exit code {server.poll()})") from None
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}", server
    finally:
        server.kill()
        server.wait()
