"""Label noise and a held-out validation split, from the data set through a run."""

import json

import numpy as np

from dldr import data as datasets
from dldr.cli import main
from dldr.store import RunStore
from tests.helpers import SMALL


def test_label_noise_runs_all_phases_and_records_the_labels(tmp_path):
    run_dir = str(tmp_path / "noisy")
    assert main(["fit", "--run-dir", run_dir, "--label-noise", "0.4", *SMALL]) == 0
    store = RunStore(run_dir)
    noisy = store.load_array("data/train_labels.npy")
    clean = datasets.load("digits").train_labels.numpy()
    changed = np.mean(noisy != clean)
    assert 0.4 * 0.9 - 0.05 < changed < 0.4 * 0.9 + 0.05  # a tenth of the draws hit the true class
    assert "train" in store.read_json("summary.json")["phases"]


def test_holdout_splits_the_noisy_training_set():
    full = datasets.load("digits", label_noise=0.4, seed=3)
    split = datasets.load("digits", label_noise=0.4, seed=3, holdout=0.2)
    assert len(split.val_y) == round(0.2 * 1438) and len(split.train_labels) == 1438 - len(split.val_y)
    # the validation images and labels are training ones, noisy labels included, and leave training
    pairs = {(bytes(x.numpy()), int(y)) for x, y in zip(full.train_x, full.train_labels, strict=True)}
    val = {(bytes(x.numpy()), int(y)) for x, y in zip(split.val_x, split.val_y, strict=True)}
    train = {(bytes(x.numpy()), int(y)) for x, y in zip(split.train_x, split.train_labels, strict=True)}
    assert val <= pairs and train <= pairs and not val & train
    assert sum(len(b[1]) for b in split.val_batches(100)) == len(split.val_y)


def test_holdout_and_subspace_batch_size_in_a_run(tmp_path):
    run_dir = str(tmp_path / "run")
    assert main(["fit", "--run-dir", run_dir, *SMALL, "--holdout", "0.25", "--subspace-batch-size", "512"]) == 0
    records = RunStore(run_dir).read_bytes("metrics.jsonl").decode().splitlines()
    epochs = [json.loads(r) for r in records if '"epoch"' in r]
    assert all(0 <= r["val_accuracy"] <= 1 for r in epochs)
    train = [r for r in epochs if r["phase"] == "train"]
    assert [r["step"] for r in train] == [2, 4]  # 1078 training images: 2 batches of 512 an epoch


def test_holdout_needs_in_memory_data(tmp_path, capsys):
    from tests.helpers import write_imagefolder

    write_imagefolder(tmp_path / "images")
    assert (
        main(
            [
                "fit",
                "--run-dir",
                str(tmp_path / "run"),
                *SMALL,
                "--data",
                f"imagefolder:{tmp_path / 'images'}",
                "--holdout",
                "0.2",
            ]
        )
        == 1
    )
    assert "--holdout needs a data set held in memory" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
