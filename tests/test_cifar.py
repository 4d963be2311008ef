"""CIFAR in the python-version layout: safe reading, clear errors, augmentation, all phases."""

import pickle

import numpy as np
import pytest
import torch

from dldr import data as datasets
from dldr.cli import main
from dldr.data import cifar
from dldr.data.source import Stats
from dldr.data.tensors import CIFAR_STATS, TensorSource
from dldr.errors import DldrError
from dldr.store import RunStore
from tests.helpers import write_cifar


def test_reads_the_images_and_labels_it_was_given(tmp_path):
    images = write_cifar(tmp_path)
    train_x, _, test_x, _, classes = cifar.read("cifar10", str(tmp_path))
    assert classes == 10 and train_x.shape == (200, 3, 32, 32) and test_x.shape == (40, 3, 32, 32)
    np.testing.assert_array_equal(train_x, images)
    data = datasets.load(f"cifar10:{tmp_path}")
    np.testing.assert_array_equal(data.train_x.numpy(), images)
    x, _ = next(data.test_batches(10))
    stats = CIFAR_STATS["cifar10"]
    expected = (test_x[7, 2] / 255.0 - stats.mean[2]) / stats.std[2]
    np.testing.assert_allclose(x[7, 2].numpy(), expected, rtol=1e-5)
    assert data.augmentation == "crop_flip" and data.num_classes == 10


def test_label_noise_draws_from_all_hundred_classes(tmp_path):
    write_cifar(tmp_path, "cifar100", per_file=400)
    clean = datasets.load(f"cifar100:{tmp_path}")
    noisy = datasets.load(f"cifar100:{tmp_path}", label_noise=1.0, seed=3)
    assert clean.num_classes == 100
    assert noisy.train_labels.max() >= 90 and len(torch.unique(noisy.train_labels)) > 90


def test_a_pickle_that_names_other_code_is_refused(tmp_path):
    write_cifar(tmp_path)
    marker = tmp_path / "executed"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    with open(tmp_path / "cifar-10-batches-py" / "data_batch_3", "wb") as f:
        pickle.dump({b"data": Payload(), b"labels": []}, f, protocol=2)
    with pytest.raises(DldrError, match="data_batch_3 is not a CIFAR batch"):
        datasets.load(f"cifar10:{tmp_path}")
    assert not marker.exists()


def test_missing_folder_and_missing_batch_are_named(tmp_path):
    with pytest.raises(DldrError, match="no cifar-10-batches-py/ folder at .*; download the python version"):
        datasets.load(f"cifar10:{tmp_path}")
    write_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_4").unlink()
    with pytest.raises(DldrError, match="data_batch_4 is missing"):
        datasets.load(f"cifar10:{tmp_path}")


def _by_label(batches):
    return {int(y): x for xb, yb in batches for x, y in zip(xb, yb)}


def test_augmented_batches_are_the_same_for_one_and_two_ranks():
    n = 64
    x = torch.randint(1, 256, (n, 3, 8, 8), dtype=torch.uint8)
    data = TensorSource(
        "toy",
        x,
        torch.arange(n),
        x[:1],
        torch.zeros(1, dtype=torch.long),
        n,
        Stats((0.0,) * 3, (1.0,) * 3),
        scale=1.0,
        augmentation="crop_flip",
    )
    one = list(data.train_batches(16, seed=1, epoch=2))
    two = [list(data.train_batches(16, seed=1, epoch=2, rank=r, world_size=2)) for r in range(2)]
    for step, (_, yb) in enumerate(one):
        assert set(yb.tolist()) == set(two[0][step][1].tolist()) | set(two[1][step][1].tolist())
    expected, got = _by_label(one), _by_label(b for rank in two for b in rank)
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    # each image is a crop of its zero-padded self, possibly mirrored
    padded = torch.nn.functional.pad(x.float(), (4, 4, 4, 4))
    for k, img in expected.items():
        crops = [padded[k, :, dy : dy + 8, dx : dx + 8] for dy in range(9) for dx in range(9)]
        assert any(torch.equal(img, c) or torch.equal(img, c.flip(-1)) for c in crops)
    assert not all(torch.equal(expected[k], x[k].float()) for k in expected)  # something was augmented


def test_cifar10_through_all_phases(tmp_path):
    write_cifar(tmp_path / "data")
    run_dir = str(tmp_path / "run")
    assert (
        main(
            [
                "fit",
                "--run-dir",
                run_dir,
                "--workers",
                "0",
                "--model",
                "cifar_resnet20",
                "--data",
                f"cifar10:{tmp_path / 'data'}",
                "--batch-size",
                "50",
                "--sample-epochs",
                "3",
                "--snapshot-every",
                "1",
                "--dim",
                "4",
                "--subspace-epochs",
                "1",
                "--label-noise",
                "0.2",
                "--quiet",
            ]
        )
        == 0
    )
    store = RunStore(run_dir)
    assert len(store.files("snapshots/")) == 3 * 4 + 1
    assert store.load_array("data/train_labels.npy").shape == (200,)
    assert store.read_json("summary.json")["phases"]["train"]["epochs"] == 1


@pytest.mark.parametrize(
    "spec, message",
    [
        ("cifar10", "unknown data set 'cifar10'"),
        ("imagenet:/x", "unknown data set 'imagenet:/x'"),
    ],
)
def test_wrong_data_syntax_is_named(spec, message):
    with pytest.raises(DldrError, match=message):
        datasets.load(spec)
