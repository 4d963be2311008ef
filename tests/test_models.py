"""The CIFAR ResNets dldr registers with timm: the paper's architecture, through all phases."""
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


@pytest.mark.parametrize("depth, params", [(20, 269_722), (32, 464_154), (44, 658_586), (56, 853_018),
                                           (110, 1_727_962)])
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


def test_cifar_resnet20_through_all_phases(tmp_path):
    """BatchNorm statistics included: the saved weights reproduce the reported accuracy."""
    run_dir = str(tmp_path / "r20")
    assert main(["fit", "--run-dir", run_dir, "--workers", "0", "--model", "cifar_resnet20", "--data",
                 "synthetic:3x32x32:10", "--batch-size", "64", "--sample-epochs", "2", "--snapshot-every", "1",
                 "--dim", "4", "--subspace-epochs", "1", "--quiet"]) == 0
    store = RunStore(run_dir)
    summary = store.read_json("summary.json")
    data = datasets.load("synthetic:3x32x32:10")
    model = models.create("cifar_resnet20", 10, data.input_shape)
    model.load_state_dict(load_file(store.abspath("model.safetensors")))
    _, accuracy = evaluate(open_run(run_dir, {"workers": 0}), model, data)
    assert accuracy == summary["test_accuracy"]
    assert summary["phases"]["basis"]["dim"] == 4
