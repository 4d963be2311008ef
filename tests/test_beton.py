"""ffcv .beton files: conversion of every source, all phases, the card checks, a pipeline that cannot hang."""

import shutil
import subprocess
import sys

import pytest
import torch

from dldr import data as datasets
from dldr.cli import main
from dldr.data import beton
from dldr.errors import DldrError
from dldr.store import RunStore
from tests.helpers import write_cifar, write_idx_folder, write_imagefolder

pytest.importorskip("ffcv")


def _convert(src: str, out_dir, name: str = "") -> str:
    for split in ("train", "val"):
        assert main(["data", "convert", src, str(out_dir / f"{name}{split}.beton"), "--split", split]) == 0
    return f"ffcv:{out_dir / f'{name}train.beton'},{out_dir / f'{name}val.beton'}"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """.beton files of an ImageFolder, a CIFAR-10 folder and an MNIST folder, with the sources' specs."""
    root = tmp_path_factory.mktemp("beton")
    write_imagefolder(root / "folder")
    write_cifar(root / "cifar", per_file=20)
    write_idx_folder(root / "mnist", train=64, test=16)
    return {
        "imagefolder": _convert(f"imagefolder:{root / 'folder'}", root, "folder-"),
        "cifar": _convert(f"cifar10:{root / 'cifar'}", root, "cifar-"),
        "mnist": _convert(f"mnist:{root / 'mnist'}", root, "mnist-"),
        "cifar_source": f"cifar10:{root / 'cifar'}",
        "mnist_source": f"mnist:{root / 'mnist'}",
        "root": root,
    }


def test_a_converted_cifar_set_reads_back_the_same_images_and_labels(converted):
    original = datasets.load(converted["cifar_source"])
    data = datasets.load(converted["cifar"], loader_workers=1)
    assert (data.num_classes, data.input_shape, data.augmentation) == (10, (3, 32, 32), "crop_flip")
    assert torch.equal(data.train_labels, original.train_labels)
    for rank in range(2):  # each rank evaluates every second image, in order
        got = list(data.test_batches(batch_size=8, rank=rank, world_size=2))
        want = list(original.test_batches(batch_size=8, rank=rank, world_size=2))
        torch.testing.assert_close(torch.cat([x for x, _ in got]), torch.cat([x for x, _ in want]))
        assert torch.equal(torch.cat([y for _, y in got]), torch.cat([y for _, y in want]))


def test_a_converted_mnist_set_reads_back_its_images_in_three_channels(converted):
    original = datasets.load(converted["mnist_source"])
    data = datasets.load(converted["mnist"], loader_workers=1)
    assert (data.num_classes, data.input_shape) == (10, (3, 28, 28)) and data.name == "ffcv:mnist"
    assert torch.equal(data.train_labels, original.train_labels)
    got, want = next(data.test_batches(batch_size=16)), next(original.test_batches(batch_size=16))
    torch.testing.assert_close(got[0], want[0].expand(-1, 3, -1, -1), rtol=1e-5, atol=1e-5)
    assert torch.equal(got[1], want[1])


def test_training_labels_come_from_the_noisy_labels_by_index(converted):
    data = datasets.load(converted["cifar"], label_noise=1.0, seed=5, loader_workers=1)
    clean = datasets.load(converted["cifar_source"]).train_labels
    assert (data.train_labels != clean).float().mean() > 0.8
    seen = []
    for x, index in data._train_images(10, seed=1, epoch=1, rank=0, world_size=1):
        assert x.shape == (10, 3, 32, 32) and x.dtype == torch.float32
        seen += index.tolist()
    assert sorted(seen) == list(range(100))  # a permutation of the 100 training images
    batches = list(data.train_batches(10, seed=1, epoch=1))
    assert torch.equal(torch.cat([y for _, y in batches]), data.train_labels[torch.tensor(seen)])


def test_imagefolder_beton_through_all_phases(converted, tmp_path):
    run_dir = str(tmp_path / "run")
    assert (
        main(
            [
                "fit",
                "--run-dir",
                run_dir,
                "--workers",
                "0",
                "--data",
                converted["imagefolder"],
                "--image-size",
                "16",
                "--batch-size",
                "8",
                "--sample-epochs",
                "3",
                "--snapshot-every",
                "1",
                "--dim",
                "8",
                "--subspace-epochs",
                "2",
                "--loader-workers",
                "1",
                "--label-noise",
                "0.1",
                "--quiet",
            ]
        )
        == 0
    )
    store = RunStore(run_dir)
    summary = store.read_json("summary.json")
    assert summary["phases"]["sample"]["snapshots"] == 3 * 6 + 1
    assert summary["test_accuracy"] >= 0.8  # tinted classes; chance is 1/3
    assert store.load_array("data/train_labels.npy").shape == (48,)


PIPELINE = """
from dldr import data
source = data.load({spec!r}, loader_workers=1)
for epoch in (1, 2):
    assert sum(len(y) for _, y in source.train_batches(10, seed=0, epoch=epoch)) == 100
print("done")
"""


def test_the_cpu_pipeline_finishes_within_a_timeout(converted):
    """ffcv 1.0.2 hangs forever on a compiled -> torch -> compiled pipeline (issue #396); ours is
    compiled throughout, then torch. A hang fails here instead of stalling the suite."""
    result = subprocess.run(
        [sys.executable, "-c", PIPELINE.format(spec=converted["cifar"])],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert result.returncode == 0 and result.stdout.strip() == "done", result.stderr[-2000:]


def test_a_beton_of_another_data_set_is_refused(converted, tmp_path):
    folder_train = converted["imagefolder"].removeprefix("ffcv:").split(",")[0]
    cifar_train, cifar_val = converted["cifar"].removeprefix("ffcv:").split(",")
    with pytest.raises(DldrError, match="come from different data sets"):
        datasets.load(f"ffcv:{folder_train},{cifar_val}")
    with pytest.raises(DldrError, match="holds the val split where the train split belongs"):
        datasets.load(f"ffcv:{cifar_val},{cifar_val}")
    # a .beton swapped in under another data set's card
    shutil.copy(folder_train, tmp_path / "train.beton")
    shutil.copy(f"{cifar_train}.json", tmp_path / "train.beton.json")
    with pytest.raises(DldrError, match="does not hold the labels its card train.beton.json records"):
        datasets.load(f"ffcv:{tmp_path / 'train.beton'},{cifar_val}")


def test_files_that_are_not_betons_are_refused(tmp_path, converted):
    cifar_train, cifar_val = converted["cifar"].removeprefix("ffcv:").split(",")
    path = tmp_path / "train.beton"
    with pytest.raises(DldrError, match="no .beton file at"):
        datasets.load(f"ffcv:{path},{cifar_val}")
    path.write_bytes(b"\0" * 100)
    shutil.copy(f"{cifar_train}.json", f"{path}.json")
    with pytest.raises(DldrError, match="train.beton is not a .beton file"):
        datasets.load(f"ffcv:{path},{cifar_val}")


def test_a_beton_without_its_card_is_refused(converted, tmp_path):
    train = converted["cifar"].removeprefix("ffcv:").split(",")[0]
    shutil.copy(train, tmp_path / "train.beton")
    with pytest.raises(DldrError, match="has no valid card train.beton.json beside it; write the .beton with"):
        datasets.load(f"ffcv:{tmp_path / 'train.beton'},{converted['cifar'].split(',')[1]}")


def test_convert_refuses_to_overwrite_and_the_spec_needs_two_files(converted, capsys):
    train = converted["cifar"].removeprefix("ffcv:").split(",")[0]
    assert main(["data", "convert", converted["cifar_source"], train]) == 1
    assert "already exists; remove it and" in capsys.readouterr().err
    with pytest.raises(DldrError, match="ffcv data is ffcv:TRAIN.beton,VAL.beton"):
        datasets.load(f"ffcv:{train}")


def test_ffcv_not_installed_is_one_line(monkeypatch, converted):
    monkeypatch.setitem(sys.modules, "ffcv", None)
    with pytest.raises(DldrError, match=r"the ffcv loader is not installed .*pip install -e \"\.\[ffcv\]\""):
        datasets.load(converted["cifar"])
    with pytest.raises(DldrError, match="the ffcv loader is not installed"):
        beton.convert(datasets.load("synthetic"), "train", str(converted["root"] / "synthetic.beton"))
