"""The MNIST family from IDX files: the reader, every bad file as one line, and runs through all phases."""

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from dldr import data as datasets
from dldr.cli import main
from dldr.data import idx
from dldr.errors import DldrError
from dldr.store import RunStore
from tests.helpers import stderr_lines, write_idx_folder

REAL = Path(idx.FASHION_MNIST_ROOT)
SMALL = [
    "--workers",
    "0",
    "--sample-epochs",
    "2",
    "--snapshot-every",
    "1",
    "--dim",
    "6",
    "--subspace-epochs",
    "2",
    "--batch-size",
    "32",
    "--quiet",
]


@pytest.mark.parametrize("zipped", [True, False])
def test_reads_the_arrays_it_was_given(tmp_path, zipped):
    written = write_idx_folder(tmp_path, zipped=zipped)
    train_x, train_y, test_x, test_y = idx.read("mnist", str(tmp_path))
    np.testing.assert_array_equal(train_x, written["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(test_y, written["t10k-labels-idx1-ubyte"])
    assert train_x.shape == (240, 28, 28) and test_x.shape == (60, 28, 28) and train_y.dtype == np.int64


def test_normalised_with_the_training_images_own_statistics(tmp_path):
    written = write_idx_folder(tmp_path)
    data = datasets.load(f"mnist:{tmp_path}")
    train = written["train-images-idx3-ubyte"] / 255.0
    assert data.input_shape == (1, 28, 28) and data.num_classes == 10
    assert data.stats.mean[0] == pytest.approx(train.mean(), rel=1e-5)
    assert data.stats.std[0] == pytest.approx(train.std(ddof=1), rel=1e-5)
    x, y = next(data.test_batches(16))
    test = written["t10k-images-idx3-ubyte"]
    np.testing.assert_allclose(
        x[3, 0].numpy(), (test[3] / 255.0 - data.stats.mean[0]) / data.stats.std[0], rtol=1e-5, atol=1e-6
    )
    np.testing.assert_array_equal(y.numpy(), written["t10k-labels-idx1-ubyte"][:16])
    # the training batches of two ranks together are the one-process batch
    whole = next(data.train_batches(32, seed=1, epoch=1))
    halves = [next(data.train_batches(32, seed=1, epoch=1, rank=r, world_size=2)) for r in range(2)]
    assert sorted(whole[1].tolist()) == sorted(halves[0][1].tolist() + halves[1][1].tolist())


def _rewrite(path: Path, transform) -> None:
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(transform(raw)))


def _header(magic: int, *shape: int) -> bytes:
    return struct.pack(f">I{len(shape)}I", magic, *shape)


@pytest.mark.parametrize(
    "damage, file, message",
    [
        ("missing", "t10k-labels-idx1-ubyte", r"t10k-labels-idx1-ubyte\(.gz\) is missing; download the four IDX files"),
        (
            "labels as images",
            "train-images-idx3-ubyte.gz",
            r"train-images-idx3-ubyte.gz is not an IDX image file \(magic number 0x00000801, not 0x00000803\)",
        ),
        ("not gzip inside", "train-labels-idx1-ubyte.gz", r"train-labels-idx1-ubyte.gz cannot be read"),
        (
            "truncated",
            "train-images-idx3-ubyte.gz",
            r"train-images-idx3-ubyte.gz is truncated: it holds 187000 bytes of images "
            r"where its header promises 188160 "
            r"\(240x28x28\)",
        ),
        (
            "cut stream",
            "train-images-idx3-ubyte.gz",
            r"train-images-idx3-ubyte.gz cannot be read .*truncated or damaged",
        ),
        ("longer", "t10k-images-idx3-ubyte.gz", r"t10k-images-idx3-ubyte.gz holds more bytes than its header promises"),
        (
            "counts differ",
            "t10k-labels-idx1-ubyte.gz",
            r"t10k-images-idx3-ubyte.gz holds 60 images but .*t10k-labels-idx1-ubyte.gz holds 59 labels",
        ),
        (
            "label 10",
            "train-labels-idx1-ubyte.gz",
            r"train-labels-idx1-ubyte.gz holds label 10, but MNIST has 10 classes",
        ),
        ("huge header", "train-images-idx3-ubyte.gz", r"claims 100000x100000x100000 bytes"),
    ],
)
def test_a_bad_idx_file_is_named(tmp_path, damage, file, message):
    folder = tmp_path / "mnist"
    write_idx_folder(folder)
    path = folder / file
    if damage == "missing":
        (folder / f"{file}.gz").unlink()
    elif damage == "labels as images":
        path.write_bytes((folder / "train-labels-idx1-ubyte.gz").read_bytes())
    elif damage == "not gzip inside":
        path.write_bytes(b"\x1f\x8b" + b"not a gzip stream" * 10)
    elif damage == "truncated":
        _rewrite(path, lambda raw: raw[: 16 + 187000])
    elif damage == "cut stream":
        path.write_bytes(path.read_bytes()[:5000])
    elif damage == "longer":
        _rewrite(path, lambda raw: raw + b"\0")
    elif damage == "counts differ":
        _rewrite(path, lambda raw: _header(0x801, 59) + raw[8:-1])
    elif damage == "label 10":
        _rewrite(path, lambda raw: raw[:8] + b"\x0a" + raw[9:])
    elif damage == "huge header":
        _rewrite(path, lambda raw: _header(0x803, 100000, 100000, 100000) + raw[16:])
    with pytest.raises(DldrError, match=message):
        datasets.load(f"mnist:{folder}")


@pytest.mark.parametrize("damage", ["truncated", "longer"])
def test_a_bad_raw_idx_file_is_named_before_it_is_read(tmp_path, damage):
    write_idx_folder(tmp_path, zipped=False)
    path = tmp_path / "train-labels-idx1-ubyte"
    raw = path.read_bytes()
    path.write_bytes(raw[:-1] if damage == "truncated" else raw + b"\0")
    expected = "is truncated: it holds 239 bytes of labels" if damage == "truncated" else "holds more bytes than"
    with pytest.raises(DldrError, match=f"train-labels-idx1-ubyte {expected}"):
        datasets.load(f"mnist:{tmp_path}")


def test_a_bad_file_from_the_command_line_is_one_line_and_writes_nothing(tmp_path, capsys):
    write_idx_folder(tmp_path / "mnist")
    (tmp_path / "mnist" / "train-labels-idx1-ubyte.gz").write_bytes(b"junk")
    run_dir = tmp_path / "run"
    assert main(["fit", "--data", f"mnist:{tmp_path / 'mnist'}", "--run-dir", str(run_dir), *SMALL]) == 1
    (line,) = stderr_lines(capsys.readouterr().err)
    assert line.startswith("dldr: error: ") and "train-labels-idx1-ubyte.gz is not an IDX label file" in line
    assert not run_dir.exists()


def test_fashion_mnist_without_a_folder_says_how_to_get_it(tmp_path, monkeypatch):
    layout = idx.LAYOUTS["fashion-mnist"]
    monkeypatch.setitem(idx.LAYOUTS, "fashion-mnist", idx.Layout(layout.title, 10, layout.get, str(tmp_path / "no")))
    with pytest.raises(
        DldrError,
        match=r"no Fashion-MNIST at .*/no; `sudo apt-get install dataset-fashion-mnist` "
        r"puts them in /usr/share/datasets/fashion-mnist",
    ):
        datasets.load("fashion-mnist")
    write_idx_folder(tmp_path / "no")
    assert len(datasets.load("fashion-mnist").train_labels) == 240  # the default folder, once it is there
    with pytest.raises(DldrError, match="mnist needs the folder of its IDX files: --data mnist:DIR"):
        datasets.load("mnist")


@pytest.mark.skipif(not REAL.is_dir(), reason="apt-get install dataset-fashion-mnist")
def test_the_real_fashion_mnist():
    data = datasets.load("fashion-mnist")
    assert len(data.train_labels) == 60_000 and len(data.test_y) == 10_000 and data.input_shape == (1, 28, 28)
    assert torch.bincount(data.train_labels).tolist() == [6000] * 10
    assert data.stats.mean[0] == pytest.approx(0.2860, abs=1e-4) and data.stats.std[0] == pytest.approx(
        0.3530, abs=1e-4
    )


def test_all_phases_with_label_noise_and_a_holdout(tmp_path):
    write_idx_folder(tmp_path / "mnist", train=320)
    run_dir = str(tmp_path / "run")
    assert (
        main(
            [
                "fit",
                "--data",
                f"mnist:{tmp_path / 'mnist'}",
                "--run-dir",
                run_dir,
                "--model",
                "cnn_pool",
                "--label-noise",
                "0.2",
                "--holdout",
                "0.2",
                "--lr",
                "0.05",
                *SMALL,
            ]
        )
        == 0
    )
    store = RunStore(run_dir)
    summary = store.read_json("summary.json")
    assert summary["phases"]["sample"]["snapshots"] == 2 * (256 // 32) + 1
    assert summary["test_accuracy"] > 0.5  # ten classes, each its own bright square
    noisy = store.load_array("data/train_labels.npy")
    clean = datasets.load(f"mnist:{tmp_path / 'mnist'}", holdout=0.2).train_labels.numpy()  # the same images
    assert 0.1 < np.mean(noisy != clean) < 0.3
    records = [json.loads(line) for line in store.read_bytes("metrics.jsonl").decode().splitlines()]
    assert all("val_accuracy" in r for r in records if "epoch" in r)
