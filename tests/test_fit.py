"""`dldr fit` and the phase commands end to end on the bundled digits: outputs, phase re-runs, resume."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dldr import data as datasets
from dldr import models, phases
from dldr.basis import basis_rows, basis_tensor, to_bf16
from dldr.cli import main
from dldr.params import FlatParams, trainable
from dldr.phases import evaluate, open_run
from dldr.store import RunStore
from tests.helpers import SMALL, StopAt, stderr_lines

SHARD = "basis/shard-00000-of-00001.npy"


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("runs") / "small")
    assert main(["fit", "--run-dir", run_dir, *SMALL]) == 0
    return run_dir


def _snapshot_of_files(run_dir):
    return json.dumps(RunStore(run_dir).manifest, sort_keys=True)


def _assert_consistent(run_dir):
    """Every file the manifest records is present and matches its checksum."""
    store = RunStore(run_dir)
    for rel in store.manifest:
        store.read_bytes(rel)


def test_fit_writes_the_run_directory(small_run):
    store = RunStore(small_run)
    steps = 3 * 11  # 1438 training digits in batches of 128
    snapshots = [f"snapshots/shard-00000-of-00001/step-{s:06d}.npy" for s in range(steps + 1)]
    assert store.files("snapshots/") == snapshots
    for rel in [
        "config.yaml",
        "basis/coefficients.npy",
        "basis/eigvals.npy",
        SHARD,
        "model.safetensors",
        "metrics.jsonl",
        "summary.json",
        "plots/curves.png",
        "plots/explained_variance.png",
    ]:
        assert store.exists(rel), rel
    num_params = 64 * 256 + 256 + 256 * 256 + 256 + 256 * 10 + 10
    snapshot = store.load_array(snapshots[5])
    assert snapshot.shape == (num_params,) and snapshot.dtype == np.float32
    assert store.load_array("basis/coefficients.npy").shape == (steps + 1, 8)
    basis = store.load_array(SHARD)  # phase 3 keeps the P it formed
    assert basis.shape == (num_params, 8) and basis.dtype == np.float32
    np.testing.assert_allclose(basis.T.astype(np.float64) @ basis, np.eye(8), atol=1e-4)
    np.testing.assert_array_equal(basis, basis_rows(store, slice(0, num_params))[0])
    assert store.read_bytes("plots/curves.png").startswith(b"\x89PNG")

    summary = store.read_json("summary.json")
    assert set(summary["phases"]["sample"]) >= {"seconds", "epochs", "snapshots", "test_accuracy"}
    assert set(summary["phases"]["basis"]) >= {"seconds", "dim", "explained_variance_ratio"}
    assert set(summary["phases"]["train"]) >= {"seconds", "epochs", "test_accuracy", "line_search_failures"}
    assert summary["phases"]["sample"]["snapshots"] == steps + 1
    assert summary["test_accuracy"] == summary["phases"]["train"]["test_accuracy"]
    memory = {name: phase["memory"] for name, phase in summary["phases"].items()}  # one rank, one shard
    assert memory["sample"][0]["snapshot_bytes"] in (4 * num_params, 8 * num_params)  # one or two waiting copies
    # one block holds all of its rows, each file's part aligned for direct reads
    assert 4 * num_params * (steps + 1) <= memory["basis"][0]["snapshot_bytes"] <= 4 * (num_params + 4096) * (steps + 1)
    assert memory["train"][0]["basis_bytes"] == basis.nbytes and memory["train"][0]["basis_rows"] == num_params
    for phase in memory.values():
        assert phase[0]["peak_rss_bytes"] > 50 << 20 and phase[0]["peak_cuda_bytes"] is None
    records = [json.loads(line) for line in store.read_bytes("metrics.jsonl").decode().splitlines()]
    assert [(r["phase"], r.get("epoch")) for r in records] == [
        ("sample", 1),
        ("sample", 2),
        ("sample", 3),
        ("basis", None),
        ("train", 1),
        ("train", 2),
    ]

    # the saved weights load into the model and give the reported test accuracy
    digits = datasets.load("digits")
    model = models.create("mlp", 10, digits.input_shape)
    model.load_state_dict(load_file(store.abspath("model.safetensors")))
    _, accuracy = evaluate(open_run(small_run, {"workers": 0}), model, digits)
    assert accuracy == summary["test_accuracy"]


def test_the_trained_model_lies_in_the_affine_subspace(small_run):
    store = RunStore(small_run)
    model = models.create("mlp", 10, (1, 8, 8))
    start = store.load_array(store.files("snapshots/")[-1])  # --start last
    basis = basis_rows(store, slice(0, len(start)))[0].astype(np.float64)
    model.load_state_dict(load_file(store.abspath("model.safetensors")))
    w = FlatParams(trainable(model)).get().numpy().astype(np.float64)
    offset = w - start
    residual = offset - basis @ (basis.T @ offset)
    assert np.linalg.norm(offset) > 0.1  # phase 3 moved away from w_start
    assert np.linalg.norm(residual) < 1e-4 * np.linalg.norm(offset)


def test_bf16_basis_is_fp32_p_rounded_and_holds_half_the_bytes(small_run, tmp_path):
    run_dir = str(tmp_path / "bf16")
    shutil.copytree(small_run, run_dir)
    fp32 = RunStore(run_dir).load_array(SHARD)
    before = RunStore(run_dir).read_json("summary.json")["phases"]["train"]
    assert main(["train", "--run-dir", run_dir, "--basis-dtype", "bf16", "--quiet"]) == 0
    store = RunStore(run_dir)
    bits = store.load_array(SHARD)  # written again, as bfloat16 bit patterns
    assert bits.dtype == np.uint16 and bits.shape == fp32.shape
    np.testing.assert_array_equal(bits, torch.from_numpy(fp32).bfloat16().view(torch.int16).numpy().view(np.uint16))
    np.testing.assert_array_equal(to_bf16(fp32), bits)
    after = store.read_json("summary.json")["phases"]["train"]
    assert (
        after["basis_dtype"] == "bf16" and after["memory"][0]["basis_bytes"] * 2 == before["memory"][0]["basis_bytes"]
    )
    assert abs(after["test_accuracy"] - before["test_accuracy"]) <= 0.01
    # the weights lie in the affine subspace of the bfloat16 P
    model = models.create("mlp", 10, (1, 8, 8))
    model.load_state_dict(load_file(store.abspath("model.safetensors")))
    offset = (
        FlatParams(trainable(model)).get().double()
        - torch.from_numpy(store.load_array(store.files("snapshots/")[-1])).double()
    )
    p = basis_tensor(bits).double()
    coords = torch.linalg.lstsq(p, offset[:, None]).solution
    assert float((offset - (p @ coords)[:, 0]).norm()) < 1e-4 * float(offset.norm())
    # back to float32 (config.yaml keeps bf16 until told): the shard is written again in float32
    assert main(["train", "--run-dir", run_dir, "--basis-dtype", "fp32", "--quiet"]) == 0
    np.testing.assert_array_equal(RunStore(run_dir).load_array(SHARD), fp32)


def test_phases_rerun_on_an_existing_run(small_run, tmp_path):
    run_dir = str(tmp_path / "copy")
    shutil.copytree(small_run, run_dir)
    before = RunStore(run_dir)
    snapshots = {rel: before.checksum(rel) for rel in before.files("snapshots/")}
    assert main(["basis", "--run-dir", run_dir, "--dim", "4", "--quiet"]) == 0
    assert not RunStore(run_dir).exists(SHARD)  # the old basis's P went with it
    assert main(["train", "--run-dir", run_dir, "--optimizer", "psgd", "--start", "first", "--quiet"]) == 0
    store = RunStore(run_dir)
    assert {rel: store.checksum(rel) for rel in store.files("snapshots/")} == snapshots
    assert store.load_array("basis/coefficients.npy").shape[1] == 4
    assert store.load_array(SHARD).shape == (store.read_json("basis/report.json")["num_params"], 4)
    summary = store.read_json("summary.json")
    assert summary["phases"]["basis"]["dim"] == 4 and summary["phases"]["train"]["optimizer"] == "psgd"
    assert "dim: 4" in store.read_bytes("config.yaml").decode()
    phases = [json.loads(line)["phase"] for line in store.read_bytes("metrics.jsonl").decode().splitlines()]
    assert phases.count("basis") == 1 and phases.count("train") == 2


def test_phase_by_phase_equals_fit(small_run, tmp_path):
    run_dir = str(tmp_path / "stepwise")
    assert main(["sample", "--run-dir", run_dir, *SMALL]) == 0
    assert set(RunStore(run_dir).read_json("summary.json")["phases"]) == {"sample"}
    assert main(["basis", "--run-dir", run_dir, "--quiet"]) == 0
    assert main(["train", "--run-dir", run_dir, "--quiet"]) == 0
    stepwise, fitted = RunStore(run_dir), RunStore(small_run)
    for rel in fitted.files("snapshots/") + ["basis/coefficients.npy", SHARD, "model.safetensors"]:
        assert stepwise.checksum(rel) == fitted.checksum(rel), rel


@pytest.mark.slow
def test_default_fit_reaches_097_on_digits(tmp_path):
    """The README's quick start: `dldr fit` with no arguments (only the run directory is moved)."""
    out = subprocess.run(
        [sys.executable, "-m", "dldr.cli", "fit", "--quiet"], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr
    (run_dir,) = (tmp_path / "runs").iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["test_accuracy"] >= 0.97
    assert f"test accuracy {summary['test_accuracy']:.4f}" in out.stdout


def _error_line(capsys):
    err = stderr_lines(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith("dldr: error: "), err
    return err[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_cuda_without_a_gpu_is_one_line(tmp_path, capsys):
    """The other bad input, and damaged run directories, are the cases of tests/test_faults.py."""
    run_dir = tmp_path / "bad"
    assert main(["fit", "--run-dir", str(run_dir), *SMALL, "--device", "cuda"]) == 1
    assert "torch sees no CUDA GPU" in _error_line(capsys)
    assert not run_dir.exists()


def test_a_stopped_train_phase_resumes_where_it_stopped(small_run, tmp_path):
    run_dir = str(tmp_path / "stopped")
    shutil.copytree(small_run, run_dir)
    run = phases.open_run(run_dir, {})
    run.session = StopAt(15)  # epoch 2 of 2; epoch 1 ended at step 11 with a saved state
    with pytest.raises(KeyboardInterrupt):
        phases.train(run)
    store = RunStore(run_dir)
    assert "train" not in store.read_json("summary.json")["phases"]
    assert torch.load(store.abspath(phases.SUBSPACE_STATE), weights_only=True)["epoch"] == 1

    assert main(["train", "--run-dir", run_dir, "--quiet"]) == 0
    resumed, uninterrupted = RunStore(run_dir), RunStore(small_run)
    assert resumed.read_json("summary.json")["phases"]["train"]["resumed_after_epoch"] == 1
    assert resumed.checksum("model.safetensors") == uninterrupted.checksum("model.safetensors")
    records = [json.loads(line) for line in resumed.read_bytes("metrics.jsonl").decode().splitlines()]
    assert [r["epoch"] for r in records if r["phase"] == "train"] == [1, 2]


def test_recompute_batchnorm_gives_the_statistics_of_the_current_weights(tmp_path):
    from torch import nn

    from dldr.config import Config

    run_dir = str(tmp_path / "run")
    run = phases.Run(Config(workers=0, run_dir=run_dir, subspace_batch_size=256), RunStore(run_dir))
    data = phases.load_data(run.cfg)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.BatchNorm1d(8))
    model[2].running_mean.fill_(5.0)  # stale statistics, as at w_start
    phases.recompute_batchnorm(run, model, data)
    with torch.no_grad():
        features = [model[1](model[0](x)) for x, _ in data.train_batches(256, run.cfg.seed + 2, 1)]
    torch.testing.assert_close(model[2].running_mean, torch.cat(features).mean(0))
    torch.testing.assert_close(model[2].running_var, torch.stack([f.var(0) for f in features]).mean(0))
    assert model[2].momentum == 0.1 and model.training
