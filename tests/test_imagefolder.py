"""ImageFolder data: the ImageNet layout, seeded per-image augmentation, all phases, clear errors."""

import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from dldr import data as datasets
from dldr.cli import main
from dldr.data.source import IMAGENET_STATS
from dldr.errors import DldrError
from dldr.store import RunStore
from tests.helpers import write_imagefolder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagefolder")
    write_imagefolder(root)
    return root


def test_classes_labels_and_the_centre_crop_of_the_test_images(folder):
    data = datasets.load(f"imagefolder:{folder}", image_size=16, loader_workers=0)
    assert data.num_classes == 3 and data.input_shape == (3, 16, 16)
    assert data.train_labels.tolist() == [k for k in range(3) for _ in range(16)]
    x, y = next(data.test_batches(batch_size=100))
    assert x.shape == (18, 3, 16, 16) and y.tolist() == [k for k in range(3) for _ in range(6)]
    path = sorted((folder / "val" / "class_1").iterdir())[2]
    with Image.open(path) as f:
        cropped = v2.functional.center_crop(v2.functional.resize(f.convert("RGB"), round(16 / 0.875)), 16)
    pixels = v2.functional.to_dtype(v2.functional.to_image(cropped), torch.float32, scale=True)
    expected = v2.functional.normalize(pixels, *IMAGENET_STATS)
    index = [str(p) for p, _ in data.val_samples].index(str(path))
    torch.testing.assert_close(x[index], expected)


def test_augmented_batches_are_the_same_for_any_ranks_and_loader_workers(folder):
    one = datasets.load(f"imagefolder:{folder}", image_size=16, loader_workers=0)
    two_workers = datasets.load(f"imagefolder:{folder}", image_size=16, loader_workers=2)
    single = list(one.train_batches(8, seed=3, epoch=2))
    ranks = [list(two_workers.train_batches(8, seed=3, epoch=2, rank=r, world_size=2)) for r in range(2)]
    assert len(single) == len(ranks[0]) == len(ranks[1]) == one.steps(8) == 6
    for step, (x, y) in enumerate(single):
        halves = [ranks[r][step] for r in range(2)]
        together = sorted(zip([t.sum().item() for h in halves for t in h[0]], [int(v) for h in halves for v in h[1]]))
        assert together == sorted(zip([t.sum().item() for t in x], y.tolist()))
    # another epoch draws other crops of the same images
    assert not torch.equal(single[0][0], next(one.train_batches(8, seed=3, epoch=3))[0])


def test_imagefolder_through_all_phases(folder, tmp_path):
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
                f"imagefolder:{folder}",
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
                "--quiet",
            ]
        )
        == 0
    )
    summary = RunStore(run_dir).read_json("summary.json")
    assert summary["phases"]["sample"]["snapshots"] == 3 * 6 + 1
    assert summary["test_accuracy"] >= 0.8  # the classes are tinted red, green and blue; chance is 1/3


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda root: [p.unlink() for p in (root / "train").rglob("*.*")], "no images in .*train; ImageFolder data is"),
        (lambda root: (root / "val" / "class_0").rename(root / "val-moved"), None),
        (lambda root: (root / "val" / "extra").mkdir(), "val has classes that .*train lacks \\(extra\\)"),
        (lambda root: [p.rename(root / "other") for p in [root / "val"]], "no val/ folder in"),
    ],
)
def test_bad_folders_are_named(tmp_path, damage, message):
    write_imagefolder(tmp_path)
    damage(tmp_path)
    if message is None:  # a val/ without some classes is fine
        assert datasets.load(f"imagefolder:{tmp_path}").num_classes == 3
        return
    with pytest.raises(DldrError, match=message):
        datasets.load(f"imagefolder:{tmp_path}")


def test_an_unreadable_image_is_named_in_one_line(tmp_path, capsys):
    write_imagefolder(tmp_path)
    broken = tmp_path / "train" / "class_2" / "3.png"
    broken.write_bytes(b"not a png")
    assert (
        main(
            [
                "fit",
                "--run-dir",
                str(tmp_path / "run"),
                "--workers",
                "0",
                "--data",
                f"imagefolder:{tmp_path}",
                "--model",
                "test_resnet",
                "--image-size",
                "16",
                "--batch-size",
                "48",
                "--loader-workers",
                "2",
                "--dim",
                "5",
                "--quiet",
            ]
        )
        == 1
    )
    err = capsys.readouterr().err
    assert err.startswith(f"dldr: error: cannot read image {broken} (") and err.endswith("; remove or replace it\n")
    assert len(err.splitlines()) == 1
