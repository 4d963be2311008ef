"""Images per second of the ffcv loader vs. the torchvision loader on one synthetic ImageFolder.

Both decode the same JPEGs into the same training batches (random-resized crop to --size, flip,
normalise) through dldr's own data sources, as phases 1 and 3 consume them. ffcv reads a .beton
written by ``dldr data convert`` (once with raw pixels, once with JPEG). The first epoch is
reported apart: it holds ffcv's compilation and the start of torchvision's worker processes.

    python benchmarks/loader_throughput.py                      # writes benchmarks/results/
    python benchmarks/loader_throughput.py --images 500 --epochs 2   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from dldr import data as datasets
from dldr.data import beton


def write_folder(root: Path, images: int, classes: int, seed: int = 0) -> None:
    """JPEGs of ImageNet's typical size (about 400 x 350, varying), smooth enough to compress like photos."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", images), ("val", max(classes, images // 10))):
        for i in tqdm(range(count), desc=f"writing {split}/", leave=False):
            folder = root / split / f"class_{i % classes:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            h, w = int(rng.integers(300, 420)), int(rng.integers(330, 500))
            coarse = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
            image = Image.fromarray(coarse).resize((w, h), Image.BILINEAR)
            image.save(folder / f"{i:06d}.jpg", quality=90)


def throughput(source: datasets.DataSource, epochs: int, batch_size: int) -> list[float]:
    """Images per second of each epoch of training batches."""
    rates = []
    for epoch in range(1, epochs + 1):
        start, seen = time.perf_counter(), 0
        for x, _ in source.train_batches(batch_size, seed=0, epoch=epoch):
            seen += len(x)
        rates.append(seen / (time.perf_counter() - start))
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000, help="training images (default: 2000)")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--size", type=int, default=224, help="training crop (default: 224)")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="decoding processes / threads")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="dldr-loaders-") as tmp:
        root = Path(tmp)
        write_folder(root / "folder", args.images, args.classes)
        spec = f"imagefolder:{root / 'folder'}"
        loaders = {"torchvision": datasets.load(spec, image_size=args.size, loader_workers=args.workers)}
        sizes = {}
        for mode in ("raw", "jpeg"):
            files = [root / f"{mode}-{split}.beton" for split in ("train", "val")]
            start = time.perf_counter()
            for path, split in zip(files, ("train", "val")):
                beton.convert(
                    datasets.load(spec), split, str(path), max_resolution=256, jpeg=mode == "jpeg", workers=args.workers
                )
            sizes[f"ffcv {mode}"] = {
                "train_beton_bytes": files[0].stat().st_size,
                "convert_seconds": time.perf_counter() - start,
            }
            loaders[f"ffcv {mode}"] = datasets.load(
                f"ffcv:{files[0]},{files[1]}", image_size=args.size, loader_workers=args.workers
            )
        folder_bytes = sum(p.stat().st_size for p in (root / "folder" / "train").rglob("*.jpg"))
        results = {}
        for name, source in loaders.items():
            rates = throughput(source, args.epochs, args.batch_size)
            results[name] = {
                "first_epoch_images_per_s": rates[0],
                "later_epochs_images_per_s": rates[1:],
                "median_later_images_per_s": statistics.median(rates[1:]),
                **sizes.get(name, {}),
            }
            print(
                f"{name:12s} first epoch {rates[0]:8.1f} img/s, later epochs median "
                f"{results[name]['median_later_images_per_s']:8.1f} img/s"
            )

    report = {
        "benchmark": "loader_throughput",
        "date": time.strftime("%Y-%m-%d"),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "processor": platform.processor(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "torch": torch.__version__,
        },
        "command": " ".join(["python", "benchmarks/loader_throughput.py", *sys.argv[1:]]),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "train_jpeg_bytes": folder_bytes,
        "results": results,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "loader_throughput.json").write_text(json.dumps(report, indent=1) + "\n")
    _plot(results, args, out / "loader_throughput.png")
    print(f"wrote {out / 'loader_throughput.json'} and loader_throughput.png")


def _plot(results: dict, args: argparse.Namespace, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    x = np.arange(len(names))
    ax.bar(x - 0.2, [results[n]["first_epoch_images_per_s"] for n in names], 0.4, label="first epoch")
    ax.bar(x + 0.2, [results[n]["median_later_images_per_s"] for n in names], 0.4, label="later epochs (median)")
    ax.set_xticks(x, names)
    ax.set_ylabel("training images / s")
    ax.set_title(f"{args.images} JPEGs -> {args.size} px crops, {args.workers} workers, {os.cpu_count()} CPUs")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
