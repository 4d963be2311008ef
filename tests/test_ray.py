"""The Ray Train engine: sharding changes nothing but rounding, a killed worker resumes, bad input.

Every test here shares one local Ray instance (the ``ray_cluster`` fixture); the runs use the
default digits configuration, so N = 1 and N = 2 can be compared step by step.
"""

import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest
import ray
import torch

from dldr import phases, ray_train
from dldr.basis import basis_rows, build_basis
from dldr.cli import main
from dldr.config import Config
from dldr.params import shard_slices
from dldr.store import RunStore, snapshot_path
from tests.helpers import largest_principal_angle, stderr_lines, write_cifar, write_idx_folder, write_imagefolder

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_cluster")]
NUM_PARAMS = 85_002


@pytest.fixture(scope="module")
def fits(tmp_path_factory):
    """`dldr fit` with the default configuration on one and on two Ray Train workers."""
    runs = {}
    for workers in (1, 2):
        runs[workers] = str(tmp_path_factory.mktemp("ray") / f"w{workers}")
        assert main(["fit", "--run-dir", runs[workers], "--workers", str(workers), "--quiet"]) == 0
    return runs


def _snapshot(store: RunStore, step: int) -> np.ndarray:
    name = f"step-{step:06d}.npy"
    return np.concatenate(
        [store.load_array(next(rel for rel in rels if rel.endswith(name))) for rels in store.snapshot_shards()]
    )


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - b) / np.linalg.norm(b.astype(np.float64)))


def test_two_workers_write_the_snapshots_of_one(fits):
    one, two = RunStore(fits[1]), RunStore(fits[2])
    assert [len(s) for s in one.snapshot_shards()] == [56]
    assert [len(s) for s in two.snapshot_shards()] == [56, 56]
    assert two.files("snapshots/shard-00001-of-00002/")[0].endswith("step-000000.npy")
    for step in range(0, 12, 2):  # the first epoch: 11 steps of the global batch of 128
        assert _relative(_snapshot(two, step), _snapshot(one, step)) < 1e-4, step


def test_two_workers_end_within_half_a_point_of_one(fits):
    summaries = {n: RunStore(run).read_json("summary.json") for n, run in fits.items()}
    assert summaries[1]["phases"]["train"]["workers"] == 1 and summaries[2]["phases"]["train"]["workers"] == 2
    assert abs(summaries[1]["test_accuracy"] - summaries[2]["test_accuracy"]) <= 0.005
    assert summaries[2]["test_accuracy"] >= 0.96
    for n, run in fits.items():  # every epoch went to metrics.jsonl on the driver's side
        records = [json.loads(line) for line in RunStore(run).read_bytes("metrics.jsonl").decode().splitlines()]
        assert [r["epoch"] for r in records if r["phase"] == "train"] == list(range(1, 6)), n


def test_each_rank_holds_only_its_shard(fits):
    """Phase 1 copies out and writes only the rank's slice; phase 3 loads only its rows of P."""
    summary = RunStore(fits[2]).read_json("summary.json")["phases"]
    lengths = [s.stop - s.start for s in shard_slices(NUM_PARAMS, 2)]
    # a rank's copies waiting to be written: one or two snapshot slices (the writer keeps at most two)
    assert [m["snapshot_bytes"] // (4 * n) for m, n in zip(summary["sample"]["memory"], lengths, strict=True)] in (
        [1, 1],
        [1, 2],
        [2, 1],
        [2, 2],
    )
    assert [m["basis_rows"] for m in summary["train"]["memory"]] == lengths
    assert [m["basis_bytes"] for m in summary["train"]["memory"]] == [4 * 40 * n for n in lengths]
    # every rank's own peak memory, and each phase 2 task's
    for phase in ("sample", "basis", "train"):
        assert len(summary[phase]["memory"]) == 2
        for m in summary[phase]["memory"]:
            assert m["peak_rss_bytes"] > 50 << 20 and m["peak_rss_reset"] and m["peak_cuda_bytes"] is None
    # each rank kept its rows of P; together they are the whole basis
    store = RunStore(fits[2])
    assert store.files("basis/shard-") == [f"basis/shard-{r:05d}-of-00002.npy" for r in range(2)]
    basis = np.concatenate([store.load_array(rel) for rel in store.files("basis/shard-")])
    assert [len(store.load_array(rel)) for rel in store.files("basis/shard-")] == lengths
    np.testing.assert_allclose(basis, basis_rows(store, slice(0, NUM_PARAMS))[0], rtol=0, atol=1e-6)
    np.testing.assert_allclose(basis.T.astype(np.float64) @ basis, np.eye(basis.shape[1]), atol=1e-4)


def test_two_ranks_build_the_basis_of_one_process(fits, tmp_path):
    """From the same snapshot files: phase 2 on 2 workers (each reading its own shard) vs one process over 1 shard."""
    sharded = str(tmp_path / "sharded")
    shutil.copytree(fits[2], sharded)
    two = RunStore(sharded)
    shards = two.snapshot_shards()
    whole = RunStore(str(tmp_path / "whole"))
    for step in range(len(shards[0])):
        whole.save_array(snapshot_path(0, 1, step), _snapshot(two, 2 * step))

    assert main(["basis", "--run-dir", sharded, "--workers", "2", "--quiet"]) == 0
    build_basis(whole, 40)
    two.reload()
    p2, p1 = (basis_rows(store, slice(0, NUM_PARAMS))[0] for store in (two, whole))
    assert largest_principal_angle(p2, p1) < 1e-4
    report = two.read_json("basis/report.json")
    assert report["num_shards"] == 2 and report["orthonormality_error"] < 1e-3
    # each shard's pass read the files of that shard, once, and nothing else
    for rels, memory in zip(shards, report["memory"], strict=True):
        assert memory["bytes_read"] == sum(two.manifest[rel]["bytes"] - 128 for rel in rels)


def _coords(run_dir: str) -> np.ndarray:
    state = torch.load(RunStore(run_dir).abspath(phases.SUBSPACE_STATE), weights_only=True)
    return state["optimizer"]["state"][0]["coords"].numpy()


def test_pbfgs_on_two_workers_follows_one(fits, tmp_path):
    """From the same basis, 22 P-BFGS steps (2 epochs) on N = 1 and on N = 2."""
    coords = {}
    for workers in (1, 2):
        run_dir = str(tmp_path / f"train{workers}")
        shutil.copytree(fits[1], run_dir)
        assert (
            main(
                [
                    "train",
                    "--run-dir",
                    run_dir,
                    "--workers",
                    str(workers),
                    "--subspace-epochs",
                    "2",
                    "--subspace-batch-size",
                    "128",
                    "--quiet",
                ]
            )
            == 0
        )
        coords[workers] = _coords(run_dir)
    assert np.linalg.norm(coords[1]) > 0.1  # the coordinates moved
    assert _relative(coords[2], coords[1]) < 1e-4


def test_a_killed_worker_resumes_with_the_same_snapshots(fits, tmp_path):
    """Rank 1 is SIGKILLed at step 27 (epoch 3); Ray restarts the group from epoch 2's checkpoint, which
    holds the learning-rate schedule past its one-epoch warm-up: restarting the warm-up would change
    every later snapshot."""
    run_dir = str(tmp_path / "killed")
    run = phases.start_run(Config(run_dir=run_dir, workers=2, max_failures=1), progress=False)
    marker = tmp_path / "killed-once"
    ray_train.run_phases(run, ["sample"], failure=ray_train.FailureInjection(rank=1, step=27, marker=str(marker)))
    assert marker.exists()
    killed, unfailed = RunStore(run_dir), RunStore(fits[2])
    checksums = {rel: killed.checksum(rel) for rel in killed.files("snapshots/")}
    assert checksums == {rel: unfailed.checksum(rel) for rel in unfailed.files("snapshots/")}
    assert len(checksums) == 2 * 56
    records = [json.loads(line) for line in killed.read_bytes("metrics.jsonl").decode().splitlines()]
    assert [r["epoch"] for r in records] == list(range(1, 11))
    assert os.listdir(killed.abspath(ray_train.CHECKPOINTS))


def test_the_local_instance_listens_on_loopback_with_token_auth():
    from ray._raylet import AuthenticationMode, get_authentication_mode

    assert get_authentication_mode() == AuthenticationMode.TOKEN
    assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")
    assert {node["NodeManagerAddress"] for node in ray.nodes()} == {"127.0.0.1"}
    listening = [
        c.laddr
        for p in psutil.Process().children(recursive=True)
        for c in _connections(p)
        if c.status == psutil.CONN_LISTEN
    ]
    assert listening and all(addr.ip in ("127.0.0.1", "::ffff:127.0.0.1") for addr in listening), listening


def _connections(process: psutil.Process) -> list:
    try:
        return process.net_connections(kind="tcp")
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return []


def _error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("dldr: ")]
    assert len(err) == 1, err
    return err[0]


def test_more_workers_than_cpus_is_one_line(tmp_path, capsys):
    run_dir = tmp_path / "too-many"
    cpus = ray.cluster_resources()["CPU"]
    assert main(["fit", "--run-dir", str(run_dir), "--workers", "128", "--quiet"]) == 1
    assert f"--workers 128 with 1 CPUs each needs 128 CPUs but the Ray cluster has {cpus:g}" in _error_line(capsys)
    # two workers fit the two CPUs one CPU at a time, not two at a time
    assert main(["fit", "--run-dir", str(run_dir), "--workers", "2", "--cpus-per-worker", str(cpus), "--quiet"]) == 1
    assert f"needs {2 * cpus:g} CPUs but the Ray cluster has {cpus:g}" in _error_line(capsys)
    assert not run_dir.exists()


def test_a_run_directory_the_workers_cannot_see_is_one_line(capsys):
    # memory:// lives in this process only: the Ray workers' processes see an empty file system
    assert main(["fit", "--run-dir", "memory://dldr-invisible", "--workers", "1", "--quiet"]) == 1
    assert "do not see the run directory memory://dldr-invisible" in _error_line(capsys)


@pytest.mark.parametrize(
    "address, message",
    [
        ("127.0.0.1:9", "cannot reach a Ray cluster at 127.0.0.1:9"),
        ("http://127.0.0.1:8265", "--address http://127.0.0.1:8265 (or RAY_ADDRESS) is a dashboard address"),
    ],
)
def test_an_unreachable_or_dashboard_address_is_one_line(tmp_path, address, message):
    out = subprocess.run(
        [sys.executable, "-m", "dldr.cli", "fit", "--address", address, "--run-dir", str(tmp_path / "r"), "--quiet"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 1
    lines = stderr_lines(out.stderr)
    assert len(lines) == 1 and lines[0].startswith(f"dldr: error: {message}")
    assert not (tmp_path / "r").exists()


def test_a_worker_error_is_one_line(tmp_path, capsys):
    run_dir = tmp_path / "diverged"
    assert main(["fit", "--run-dir", str(run_dir), "--workers", "1", "--lr", "1e6", "--quiet"]) == 1
    line = _error_line(capsys)
    assert "sampling loss became nan" in line and "lower --lr" in line


def test_another_process_connects_by_address_with_the_token(tmp_path):
    """`--address` of a running cluster (this session's), as a job on a shared cluster would."""
    address = ray.get_runtime_context().gcs_address
    run_dir = tmp_path / "by-address"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "dldr.cli",
            "sample",
            "--address",
            address,
            "--run-dir",
            str(run_dir),
            "--sample-epochs",
            "1",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert len(RunStore(str(run_dir)).files("snapshots/shard-00000-of-00001/")) == 1 + 11  # every step of 11


@pytest.mark.parametrize("max_failures", [0, 1])
def test_a_killed_worker_is_one_line(tmp_path, max_failures):
    """A Ray Train worker SIGKILLed in phase 1 of a `dldr sample` process (on this session's cluster): with
    --max-failures 0 one line says what failed and what to do; with 1 the phase resumes and one line names
    Ray's report. Ray's own tracebacks go to that report, not to the terminal."""
    run_dir = tmp_path / "run"
    started = time.time()
    sampling = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dldr.cli",
            "sample",
            "--address",
            ray.get_runtime_context().gcs_address,
            "--run-dir",
            str(run_dir),
            "--workers",
            "2",
            "--sample-epochs",
            "60",
            "--snapshot-every",
            "0",
            "--max-failures",
            str(max_failures),
            "--quiet",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"},
    )
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.exists() and '"epoch": 2' in metrics.read_text()):
        assert sampling.poll() is None and time.monotonic() < deadline, sampling.communicate()
        time.sleep(0.1)
    worker = next(
        p
        for p in psutil.Process().children(recursive=True)  # one of this job's, not an earlier one's
        if p.create_time() >= started and "RayTrainWorker" in " ".join(p.cmdline())
    )
    worker.kill()
    out, err = sampling.communicate(timeout=300)
    lines = stderr_lines(err)
    assert len(lines) == 1, err
    report = lines[0].rpartition("Ray's report: ")[2]
    assert "Traceback" in open(report).read()
    os.remove(report)
    if max_failures == 0:
        assert sampling.returncode == 1
        assert lines[0].startswith("dldr: error: phase sample: ")  # the death, or a peer's lost connection
        assert (
            f"give --max-failures N to let the phase restart from its last checkpoint, or run `dldr sample "
            f"--run-dir {run_dir}` again" in lines[0]
        )
    else:
        assert sampling.returncode == 0, err
        assert lines[0].startswith("dldr: the run ended well, but Ray reported errors on the way")
        assert [len(rels) for rels in RunStore(str(run_dir)).snapshot_shards()] == [61, 61]


def test_cifar_resnet_on_cifar_through_all_phases_on_two_workers(tmp_path):
    """A BatchNorm model on augmented CIFAR-format data, on Ray Train workers."""
    write_cifar(tmp_path / "data")
    run_dir = str(tmp_path / "run")
    assert (
        main(
            [
                "fit",
                "--run-dir",
                run_dir,
                "--workers",
                "2",
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
                "--quiet",
            ]
        )
        == 0
    )
    store = RunStore(run_dir)
    assert [len(rels) for rels in store.snapshot_shards()] == [13, 13]
    summary = store.read_json("summary.json")["phases"]
    assert summary["train"]["workers"] == 2 and summary["basis"]["dim"] == 4


IMAGEFOLDER_RUN = [
    "--image-size",
    "16",
    "--batch-size",
    "8",
    "--sample-epochs",
    "2",
    "--snapshot-every",
    "1",
    "--dim",
    "4",
    "--subspace-epochs",
    "1",
    "--loader-workers",
    "1",
    "--quiet",
]


def test_imagefolder_on_two_workers_follows_the_in_process_trajectory(tmp_path):
    """Crops are seeded per image and the sampler deals one global batch, so 2 ranks decode and
    train on exactly the pixels one process does."""
    write_imagefolder(tmp_path / "data")
    stores = {}
    for workers in (0, 2):
        run_dir = str(tmp_path / f"w{workers}")
        assert (
            main(
                [
                    "fit",
                    "--run-dir",
                    run_dir,
                    "--workers",
                    str(workers),
                    "--data",
                    f"imagefolder:{tmp_path / 'data'}",
                    *IMAGEFOLDER_RUN,
                ]
            )
            == 0
        )
        stores[workers] = RunStore(run_dir)
    assert [len(rels) for rels in stores[2].snapshot_shards()] == [13, 13]
    for step in (1, 6, 12):
        assert _relative(_snapshot(stores[2], step), _snapshot(stores[0], step)) < 1e-4, step


def test_an_idx_folder_with_noise_and_holdout_on_two_workers_follows_the_in_process_trajectory(tmp_path):
    """The noisy labels and the held-out split are drawn once from the seed, so 2 ranks train on
    exactly the images and labels one process does."""
    write_idx_folder(tmp_path / "data", train=96, test=32)
    stores = {}
    for workers in (0, 2):
        run_dir = str(tmp_path / f"w{workers}")
        assert (
            main(
                [
                    "fit",
                    "--run-dir",
                    run_dir,
                    "--workers",
                    str(workers),
                    "--data",
                    f"mnist:{tmp_path / 'data'}",
                    "--label-noise",
                    "0.2",
                    "--holdout",
                    "0.25",
                    "--batch-size",
                    "8",
                    "--sample-epochs",
                    "1",
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
        stores[workers] = RunStore(run_dir)
    assert [len(rels) for rels in stores[2].snapshot_shards()] == [10, 10]  # 72 training images, 9 steps
    for step in (1, 5, 9):
        assert _relative(_snapshot(stores[2], step), _snapshot(stores[0], step)) < 1e-4, step


def test_ffcv_on_two_workers_deals_each_rank_half_an_epoch(tmp_path):
    """ffcv's distributed=True loader: 48 images in global batches of 8 are 6 steps on each rank."""
    pytest.importorskip("ffcv")
    write_imagefolder(tmp_path / "data")
    for split in ("train", "val"):
        assert (
            main(
                [
                    "data",
                    "convert",
                    f"imagefolder:{tmp_path / 'data'}",
                    str(tmp_path / f"{split}.beton"),
                    "--split",
                    split,
                ]
            )
            == 0
        )
    run_dir = str(tmp_path / "run")
    assert (
        main(
            [
                "fit",
                "--run-dir",
                run_dir,
                "--workers",
                "2",
                "--data",
                f"ffcv:{tmp_path / 'train.beton'},{tmp_path / 'val.beton'}",
                *IMAGEFOLDER_RUN,
            ]
        )
        == 0
    )
    store = RunStore(run_dir)
    assert [len(rels) for rels in store.snapshot_shards()] == [13, 13]
    summary = store.read_json("summary.json")
    assert summary["phases"]["train"]["workers"] == 2 and summary["test_accuracy"] >= 0.8
