"""--tracker mlflow and --tracker tensorboard, read back with each library's own reader and compared
with metrics.jsonl: in-process to MLflow's default local store, and on two Ray workers (rank 0 logs)
to an `mlflow server` on 127.0.0.1 with the run directory on S3 (the S3 test of two Ray workers).
"""

import json
import os
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict

import pytest
import s3fs
import yaml
from mlflow.tracking import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dldr.cli import main
from dldr.config import Config
from dldr.store import TENSORBOARD, RunStore
from tests.helpers import free_port, stderr_lines

FIT = [
    "fit",
    "--sample-epochs",
    "4",
    "--snapshot-every",
    "1",
    "--dim",
    "8",
    "--subspace-epochs",
    "3",
    "--quiet",
    "--tracker",
    "mlflow",
    "--tracker",
    "tensorboard",
]
SAMPLE_EPOCHS = 4


def _records(store: RunStore) -> list[dict]:
    return [json.loads(line) for line in store.read_bytes("metrics.jsonl").decode().splitlines()]


def _expected(store: RunStore, key: str) -> dict[str, list[tuple[int, float]]]:
    """From metrics.jsonl: ``phase/key`` -> [(step, value)] on the one step axis (phase 3 after phase 1)."""
    out: dict[str, list[tuple[int, float]]] = {}
    for r in _records(store):
        if key in r:
            step = r.get("epoch", 0) + (SAMPLE_EPOCHS if r["phase"] != "sample" else 0)
            out.setdefault(f"{r['phase']}/{key}", []).append((step, r[key]))
    return out


def _check_mlflow(client: MlflowClient, store: RunStore) -> None:
    (run,) = client.search_runs(
        [client.get_experiment_by_name("dldr").experiment_id], f"tags.`dldr.run_dir` = '{store.url}'"
    )
    assert run.info.status == "FINISHED" and run.data.tags["dldr.command"] == "dldr fit"
    assert run.data.params == {k: str(v) for k, v in asdict(_config(store)).items()}
    for key in ("test_accuracy", "train_loss", "explained_variance_ratio"):
        for name, points in _expected(store, key).items():
            history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, name))
            assert history == points, name
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/test_accuracy")] == [5, 6, 7]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    artifacts |= {a.path for folder in ("plots", "basis") for a in client.list_artifacts(run.info.run_id, folder)}
    assert {"summary.json", "basis/report.json", "plots/curves.png", "plots/explained_variance.png"} <= artifacts
    summary = json.loads(open(client.download_artifacts(run.info.run_id, "summary.json")).read())
    assert summary == store.read_json("summary.json")


def _config(store: RunStore) -> Config:
    return Config.from_dict(yaml.safe_load(store.read_bytes("config.yaml")))


def _check_tensorboard(folder: str, store: RunStore) -> None:
    events = EventAccumulator(folder, size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    for key in ("test_accuracy", "train_loss"):
        for name, points in _expected(store, key).items():
            logged = [(e.step, e.value) for e in events.Scalars(name)]
            assert [s for s, _ in logged] == [s for s, _ in points], name
            assert all(abs(a - b) <= 1e-6 * max(1.0, abs(b)) for (_, a), (_, b) in zip(logged, points)), name
    texts = set(events.Tags()["tensors"])
    assert {"config/text_summary", "summary/text_summary"} <= texts


def test_in_process_to_mlflow_default_store_and_tensorboard_in_the_run_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_dir = str(tmp_path / "run")
    assert main([*FIT, "--run-dir", run_dir, "--workers", "0"]) == 0
    store = RunStore(run_dir)
    assert (tmp_path / "mlflow.db").exists()  # MLflow's own default, in the working folder
    _check_mlflow(MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}"), store)
    assert store.files(f"{TENSORBOARD}/")  # listed in the manifest, checksummed like every file
    _check_tensorboard(os.path.join(run_dir, TENSORBOARD), store)


@pytest.fixture
def mlflow_server(tmp_path):
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{tmp_path / 'server.db'}",
            "--artifacts-destination",
            str(tmp_path / "artifacts"),
            "--workers",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2).close()
            break
        except OSError:
            assert server.poll() is None and time.monotonic() < deadline, "mlflow server did not start"
            time.sleep(0.5)
    try:
        yield url
    finally:
        os.killpg(server.pid, 9)  # the server and its gunicorn/uvicorn workers
        server.wait()


@pytest.mark.slow
@pytest.mark.usefixtures("ray_cluster")
def test_two_ray_workers_on_s3_log_to_an_mlflow_server(mlflow_server, s3, tmp_path, monkeypatch):
    """Every phase on two Ray workers with the run directory on S3 (Ray Train's checkpoints too), rank 0
    logging to an `mlflow server`. Ray's workers were started before this test: the tracking URI reaches
    them through dldr, not their environment."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    run_dir = f"{s3}/tracked"
    assert main([*FIT, "--run-dir", run_dir, "--workers", "2"]) == 0
    store = RunStore(run_dir)
    summary = store.read_json("summary.json")
    assert summary["phases"]["train"]["workers"] == 2 and summary["test_accuracy"] >= 0.9
    shards = store.snapshot_shards()
    assert len(shards) == 2 and len(shards[0]) == len(shards[1]) == 45
    for rel in [*shards[0][-3:], *shards[1][-3:], *store.files("basis/")]:  # written by each rank, checksummed
        store.read_bytes(rel)
    # Ray Train's checkpoints went to the same bucket, through its own storage layer: the last two it
    # keeps mark the end of phases 1 and 2 (phase 3 resumes from subspace/state.pt)
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    marks = sorted(p for p in fs.find(store.abspath("checkpoints")) if p.endswith("/progress.json"))
    assert [p.split("/")[-2] for p in marks] == ["basis-finished", "sample-finished"]
    assert json.loads(fs.cat(marks[0])) == {"phase": "basis", "completed": ["sample", "basis"]}

    _check_mlflow(MlflowClient(mlflow_server), store)
    events = tmp_path / "events"
    s3fs.S3FileSystem(skip_instance_cache=True).get(store.abspath(TENSORBOARD), str(events), recursive=True)
    _check_tensorboard(str(events), store)


def test_an_unknown_tracker_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["fit", "--run-dir", str(tmp_path / "run"), "--workers", "0", "--tracker", "wandb"])
    assert exited.value.code == 2
    err = stderr_lines(capsys.readouterr().err)
    assert len(err) == 1 and "argument --tracker: invalid choice: 'wandb'" in err[0]
    assert not (tmp_path / "run").exists()
