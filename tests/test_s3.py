"""Run directories on S3: every phase, resume, checksums and the lock against an S3-compatible server
(moto's) in a process of its own on 127.0.0.1, reached over HTTP with AWS_ENDPOINT_URL as a user's
would be; and the server stopped mid-run. Two Ray workers on S3: tests/test_tracking.py (with the
trackers); a Ray job on S3: tests/test_jobs.py.
"""

import os
import subprocess
import sys
import time

import pytest
import s3fs

from dldr import phases
from dldr.cli import main
from dldr.store import LOCK, MANIFEST, RunStore
from tests.helpers import SMALL, StopAt, s3_server, stderr_lines


def _fs() -> s3fs.S3FileSystem:
    return s3fs.S3FileSystem(skip_instance_cache=True)


def _copy(src: str, dst: str) -> str:
    _fs().copy(src.removeprefix("s3://"), dst.removeprefix("s3://"), recursive=True)
    return dst


def _error_line(capsys) -> str:
    err = stderr_lines(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith("dldr: error: "), err
    return err[0]


@pytest.fixture(scope="module")
def runs(s3, tmp_path_factory):
    """The same small in-process fit to a local folder and to S3."""
    local, remote = str(tmp_path_factory.mktemp("s3") / "local"), f"{s3}/in-process"
    for run_dir in (local, remote):
        assert main(["fit", "--run-dir", run_dir, *SMALL]) == 0
    return local, remote


def test_a_fit_to_s3_writes_the_bytes_a_local_fit_writes(runs):
    local, remote = RunStore(runs[0]), RunStore(runs[1])
    assert sorted(remote.manifest) == sorted(local.manifest)
    same = [rel for rel in local.manifest if rel.endswith((".npy", ".safetensors"))]
    assert len(same) > 20 and all(remote.checksum(rel) == local.checksum(rel) for rel in same)
    for rel in remote.manifest:  # every object there, each matching its checksum
        remote.read_bytes(rel)
    objects = {path.removeprefix(remote.root + "/") for path in _fs().find(remote.root)}
    assert objects == {*remote.manifest, MANIFEST}  # no lock, no temporary objects left
    assert remote.read_json("summary.json")["test_accuracy"] == local.read_json("summary.json")["test_accuracy"]


def test_a_stopped_train_phase_on_s3_resumes_where_it_stopped(runs, s3):
    run_dir = _copy(runs[1], f"{s3}/stopped")
    run = phases.open_run(run_dir, {})
    run.session = StopAt(15)  # epoch 2 of 2; epoch 1 ended at step 11 with a saved state
    with pytest.raises(KeyboardInterrupt):
        phases.train(run)
    assert "train" not in RunStore(run_dir).read_json("summary.json")["phases"]

    assert main(["train", "--run-dir", run_dir, "--quiet"]) == 0
    resumed = RunStore(run_dir)
    assert resumed.read_json("summary.json")["phases"]["train"]["resumed_after_epoch"] == 1
    assert resumed.checksum("model.safetensors") == RunStore(runs[1]).checksum("model.safetensors")


def test_a_flipped_byte_in_an_object_is_caught(runs, s3, capsys):
    run_dir = _copy(runs[1], f"{s3}/flipped")
    store = RunStore(run_dir)
    victim = store.abspath("snapshots/shard-00000-of-00001/step-000017.npy")
    data = bytearray(_fs().cat_file(victim))
    data[-100] ^= 0x01
    _fs().pipe_file(victim, bytes(data))
    manifest = _fs().cat_file(store.abspath(MANIFEST))

    assert main(["basis", "--run-dir", run_dir, "--quiet"]) == 1
    assert (
        f"{victim} is corrupt (its xxh3_128 checksum does not match manifest.json); re-run `dldr sample`"
        in _error_line(capsys)
    )
    assert _fs().cat_file(store.abspath(MANIFEST)) == manifest  # the run directory as it was


def test_a_run_on_s3_in_use_is_refused_and_its_lock_is_an_object(runs, s3, capsys):
    store = RunStore(runs[1])
    with store.lock("dldr train"):
        assert _fs().exists(store.abspath(LOCK))
        assert main(["train", "--run-dir", runs[1], "--quiet"]) == 1
        line = _error_line(capsys)
    assert f"{runs[1]} is in use by `dldr train` (pid {os.getpid()} on " in line
    assert f"delete {runs[1]}/{LOCK} and run this again" in line
    assert not _fs().exists(store.abspath(LOCK))


@pytest.mark.slow
def test_the_s3_server_stopped_mid_run_is_one_line(tmp_path):
    """A server of this test's own, killed while `dldr fit` writes phase 1's snapshots to it."""
    with s3_server() as (endpoint, server):
        fs = s3fs.S3FileSystem(endpoint_url=endpoint, key="testing", secret="testing", skip_instance_cache=True)
        fs.mkdir("dldr-stopped")
        env = {
            **os.environ,
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        fit = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dldr",
                "fit",
                "--run-dir",
                "s3://dldr-stopped/run",
                *SMALL,
                "--sample-epochs",
                "40",
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 300
        while not fs.exists("dldr-stopped/run/snapshots/shard-00000-of-00001/step-000020.npy"):
            assert fit.poll() is None and time.monotonic() < deadline, fit.communicate()
            time.sleep(0.2)
        server.kill()
        stopped = time.monotonic()
        _, err = fit.communicate(timeout=300)
    assert fit.returncode == 1
    lines = stderr_lines(err)
    assert len(lines) == 1, lines
    assert lines[0].startswith(
        "dldr: error: the object store of s3://dldr-stopped/run failed (Could not connect to "
        f'the endpoint URL: "{endpoint}/dldr-stopped'
    ), lines
    assert lines[0].endswith(
        "check its endpoint (AWS_ENDPOINT_URL), the credentials and the network, then run the "
        "command again (the files completed so far are kept)"
    )
    print(f"the error came {time.monotonic() - stopped:.1f} s after the server stopped")
