"""Models through timm: the paper's CIFAR ResNets, a model of each timm family, sizes, precision."""

import json

import pytest
import torch
from safetensors.torch import load_file

from dldr import data as datasets
from dldr import models
from dldr.cifar_resnet import BasicBlock
from dldr.cli import main
from dldr.params import num_params
from dldr.phases import evaluate, open_run
from dldr.store import RunStore


@pytest.mark.parametrize(
    "depth, params", [(20, 269_722), (32, 464_154), (44, 658_586), (56, 853_018), (110, 1_727_962)]
)
def test_cifar_resnets_have_the_papers_size(depth, params):
    """Option-A shortcuts add no parameters: 0.27M, 0.46M, 0.66M, 0.85M, 1.7M (He et al. 2016)."""
    model = models.create(f"cifar_resnet{depth}", 10, (3, 32, 32))
    assert num_params(model) == params
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_option_a_shortcut_subsamples_and_zero_pads():
    block = BasicBlock(16, 32, stride=2)
    x = torch.randn(2, 16, 8, 8)
    shortcut = block.shortcut(x)
    assert shortcut.shape == (2, 32, 4, 4)
    assert torch.equal(shortcut[:, 8:24], x[:, :, ::2, ::2])
    assert not shortcut[:, :8].any() and not shortcut[:, 24:].any()


@pytest.mark.parametrize(
    "name, layer",
    [
        ("cifar_resnet20", "BasicBlock"),
        ("test_resnet", "Bottleneck"),
        ("test_vit", "Attention"),
        ("test_convnext", "ConvNeXtBlock"),
    ],
)
def test_a_model_of_each_family_through_all_phases(tmp_path, name, layer):
    """Normalisation state included: the saved weights reproduce the reported accuracy."""
    run_dir = str(tmp_path / name)
    assert (
        main(
            [
                "fit",
                "--run-dir",
                run_dir,
                "--workers",
                "0",
                "--model",
                name,
                "--data",
                "synthetic:3x32x32:10",
                "--batch-size",
                "64",
                "--sample-epochs",
                "2",
                "--snapshot-every",
                "1",
                "--dim",
                "4",
                "--subspace-epochs",
                "1",
                "--quiet",
            ]
        )
        == 0
    )
    store = RunStore(run_dir)
    summary = store.read_json("summary.json")
    data = datasets.load("synthetic:3x32x32:10")
    model = models.create(name, 10, data.input_shape)
    assert layer in {type(m).__name__ for m in model.modules()}
    model.load_state_dict(load_file(store.abspath("model.safetensors")))
    _, accuracy = evaluate(open_run(run_dir, {"workers": 0}), model, data)
    assert accuracy == summary["test_accuracy"]
    assert summary["phases"]["sample"]["snapshots"] == 2 * 8 + 1 and summary["phases"]["basis"]["dim"] == 4


def test_the_model_takes_the_data_sets_channels_classes_and_size():
    vit = models.create("test_vit", 7, (1, 48, 48))
    assert vit(torch.zeros(2, 1, 48, 48)).shape == (2, 7)
    assert vit.patch_embed.img_size == (48, 48)


def test_an_image_size_the_model_cannot_take_is_one_line(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert (
        main(
            ["fit", "--run-dir", str(run_dir), "--workers", "0", "--model", "test_vit", "--data", "synthetic:3x8x8:10"]
        )
        == 1
    )
    err = capsys.readouterr().err
    assert err == (
        "dldr: error: test_vit cannot take 3x8x8 images (Input height (8) should be divisible by patch "
        "size (16).); pick a model for this size, or another --image-size for imagefolder and ffcv data\n"
    )
    assert not run_dir.exists()


def test_bf16_autocast_trains_close_to_fp32(tmp_path):
    """bf16 rounds the forward pass: the first epoch's loss moves, but only a little."""
    losses = {}
    for precision in ("fp32", "bf16"):
        run_dir = str(tmp_path / precision)
        assert (
            main(
                [
                    "fit",
                    "--run-dir",
                    run_dir,
                    "--workers",
                    "0",
                    "--precision",
                    precision,
                    "--sample-epochs",
                    "1",
                    "--dim",
                    "4",
                    "--subspace-epochs",
                    "1",
                    "--quiet",
                ]
            )
            == 0
        )
        records = RunStore(run_dir).read_bytes("metrics.jsonl").decode().splitlines()
        losses[precision] = [json.loads(r)["train_loss"] for r in records if '"epoch"' in r]
    for fp32, bf16 in zip(losses["fp32"], losses["bf16"]):
        assert fp32 != bf16 and bf16 == pytest.approx(fp32, rel=0.05)


@pytest.mark.parametrize(
    "name, params",
    [("lenet5", 61_706), ("cnn_pool", 20_538), ("cifar_resnet20", 269_434), ("mlp", 269_322), ("cnn", 29_162)],
)
def test_every_registered_model_takes_28_pixel_grayscale_images(name, params):
    """The MNIST family's shape; LeNet-5 has its classic 61.7k parameters there."""
    model = models.create(name, 10, (1, 28, 28))
    assert num_params(model) == params
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_a_cifar_resnet_through_all_phases_on_mnist_format_data(tmp_path):
    from tests.helpers import write_idx_folder

    write_idx_folder(tmp_path / "mnist", train=128, test=32)
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
                f"mnist:{tmp_path / 'mnist'}",
                "--batch-size",
                "32",
                "--sample-epochs",
                "2",
                "--snapshot-every",
                "1",
                "--dim",
                "4",
                "--subspace-epochs",
                "1",
                "--quiet",
            ]
        )
        == 0
    )
    summary = RunStore(run_dir).read_json("summary.json")
    assert summary["phases"]["sample"]["snapshots"] == 9 and 0 <= summary["test_accuracy"] <= 1
