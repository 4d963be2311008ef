"""Ray Jobs: ``dldr submit`` sends a run to a Ray cluster; ``status``, ``logs``, ``stop`` and ``jobs`` follow it.

A job runs ``python -m dldr fit --config dldr-job.yaml`` in a working_dir that holds a copy of
this dldr package and the run's resolved configuration, so the cluster runs the code and the
configuration of the submitting side; the nodes need dldr's dependencies (torch, timm, Ray),
which the cluster/ configs install. Inside the job, ``dldr fit`` finds its cluster through the
RAY_ADDRESS that Ray Jobs sets for the entrypoint. The client speaks to the cluster's dashboard
(http://HOST:8265) and sends the cluster's token, found where Ray looks for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import requests
from ray.exceptions import AuthenticationError
from ray.job_submission import JobDetails, JobStatus, JobSubmissionClient

import dldr
from dldr.config import AUTO, Config, read_spec
from dldr.errors import DldrError
from dldr.store import holds_run

DEFAULT_ADDRESS = "http://127.0.0.1:8265"  # what cluster/local-head.sh starts
JOB_CONFIG = "dldr-job.yaml"
ENTRYPOINT = f"python -m dldr fit --config {JOB_CONFIG}"
RUN_DIR_KEY = "dldr_run_dir"  # the job's metadata: where its run directory is
TOKEN_PLACES = "RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token"

# "Uploading package ...", "WebSocket closed ...": dldr says what it submitted and how the job ended
for _name in (
    "ray.dashboard.modules.dashboard_sdk",
    "ray.dashboard.modules.job.sdk",
    "ray._private.runtime_env.packaging",
):
    logging.getLogger(_name).setLevel(logging.WARNING)


def auth_token() -> tuple[str | None, str]:
    """The cluster token and where it came from, in Ray's order of precedence.

    RAY_AUTH_TOKEN, else the file RAY_AUTH_TOKEN_PATH names (which must then exist, as Ray
    requires), else ~/.ray/auth_token; ``None`` when there is none, for clusters without tokens.
    """
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return os.environ["RAY_AUTH_TOKEN"].strip(), "RAY_AUTH_TOKEN"
    named = os.environ.get("RAY_AUTH_TOKEN_PATH")
    path = Path(named).expanduser() if named else Path.home() / ".ray" / "auth_token"
    try:
        token = path.read_text().strip()
    except FileNotFoundError:
        if named:
            raise DldrError(
                f"RAY_AUTH_TOKEN_PATH names {path}, which does not exist; point it at the cluster's "
                "token file, or unset it"
            ) from None
        return None, TOKEN_PLACES
    except OSError as e:
        raise DldrError(f"cannot read the Ray token file {path}: {e.strerror}") from None
    if not token and named:
        raise DldrError(f"the Ray token file {path} (RAY_AUTH_TOKEN_PATH) is empty; put the cluster's token in it")
    return token or None, str(path)


@dataclass
class Cluster:
    """A connection to a cluster's job server, turning its failures into one-line errors."""

    address: str
    client: JobSubmissionClient
    token_source: str

    @classmethod
    def connect(cls, address: str = "") -> Cluster:
        """``address``, else RAY_ADDRESS, else the local head's http://127.0.0.1:8265."""
        address = (address or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS).rstrip("/")
        if "://" not in address:
            address = f"http://{address}"
        if not address.startswith(("http://", "https://")):
            raise DldrError(
                f"{address} is not a Ray dashboard address; give --address or RAY_ADDRESS as "
                "http://HOST:8265 (the cluster's dashboard, which serves Ray Jobs)"
            )
        token, source = auth_token()
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        with _errors(address, source, bool(token)):
            return cls(address, JobSubmissionClient(address, headers=headers), source)

    @contextlib.contextmanager
    def calls(self, job_id: str | None = None) -> Iterator[None]:
        with _errors(self.address, self.token_source, True, job_id):
            yield


@contextlib.contextmanager
def _errors(address: str, token_source: str, sent_token: bool, job_id: str | None = None) -> Iterator[None]:
    try:
        yield
    except AuthenticationError:
        if sent_token:
            raise DldrError(
                f"the Ray cluster at {address} refused the token from {token_source}; put the cluster's "
                "token there (`ray get-auth-token` on its head prints it)"
            ) from None
        raise DldrError(
            f"the Ray cluster at {address} needs a token and none was found in {TOKEN_PLACES}; "
            "put the cluster's token there (`ray get-auth-token` on its head prints it)"
        ) from None
    except (ConnectionError, requests.RequestException):
        raise DldrError(
            f"cannot reach a Ray dashboard at {address}; start a cluster (cluster/local-head.sh) or give "
            "its dashboard address with --address or RAY_ADDRESS (http://HOST:8265)"
        ) from None
    except RuntimeError as e:
        if job_id and "does not exist" in str(e):
            raise DldrError(
                f"there is no job {job_id} on the Ray cluster at {address}; `dldr jobs` lists them"
            ) from None
        raise DldrError(f"the Ray job server at {address} failed: {str(e).strip().splitlines()[0]}") from None


# ---- submit -------------------------------------------------------------------------------------


@dataclass
class Submission:
    job_id: str
    run_dir: str
    cluster: Cluster


def submit(spec: str, overrides: dict[str, Any], address: str = "") -> Submission:
    """Check the spec, stage the package and the resolved config, and submit the job.

    The run directory is the spec's (or ``--run-dir``), else ``runs/<job id>``; a relative path
    is taken from here and sent as an absolute one, so the job writes where this side can read
    when both share a file system (or use an object store URL, ``s3://bucket/run``).
    """
    try:
        text = Path(spec).read_text()
    except OSError as e:
        raise DldrError(f"cannot read the job spec {spec}: {e.strerror}") from None
    values, resources = read_spec(text, spec)
    if values.get("address"):
        raise DldrError(
            f"{spec}: a submitted job runs on the cluster it is submitted to; remove `address` "
            "(give the cluster with `dldr submit --address http://HOST:8265`)"
        )
    values.update(overrides)
    if values.get("workers") in (None, AUTO):  # decided here, not on this machine: a job runs on a cluster
        values["workers"] = 1
    job_id = f"dldr-{Path(spec).stem}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
    run_dir = values.get("run_dir") or f"runs/{job_id}"
    if "://" not in run_dir:
        run_dir = os.path.abspath(run_dir)
    cfg = Config.from_dict({**values, "run_dir": run_dir}, source=spec)
    if holds_run(run_dir):
        raise DldrError(f"{run_dir} already holds a run; give the job a new --run-dir")
    cluster = Cluster.connect(address)
    with tempfile.TemporaryDirectory(prefix="dldr-job-") as staging:
        shutil.copytree(
            Path(dldr.__file__).parent, Path(staging) / "dldr", ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
        )
        (Path(staging) / JOB_CONFIG).write_text(cfg.to_yaml())
        reserve = {
            "entrypoint_num_cpus": resources.entrypoint_cpus,
            "entrypoint_num_gpus": resources.entrypoint_gpus,
            "entrypoint_memory": int(resources.entrypoint_memory_gb * 2**30),
        }
        with cluster.calls():
            cluster.client.submit_job(
                entrypoint=ENTRYPOINT,
                submission_id=job_id,
                runtime_env={"working_dir": staging},
                metadata={RUN_DIR_KEY: run_dir},
                **{k: v for k, v in reserve.items() if v},
            )
    return Submission(job_id, run_dir, cluster)


# ---- watch --------------------------------------------------------------------------------------


def info(cluster: Cluster, job_id: str) -> JobDetails:
    with cluster.calls(job_id):
        return cluster.client.get_job_info(job_id)


def logs(cluster: Cluster, job_id: str) -> str:
    with cluster.calls(job_id):
        return cluster.client.get_job_logs(job_id)


def follow(cluster: Cluster, job_id: str) -> JobDetails:
    """Print the job's logs as they come until it ends; its final details."""

    async def tail() -> None:
        async for chunk in cluster.client.tail_job_logs(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    info(cluster, job_id)  # a job that does not exist is one line, before the websocket
    with cluster.calls(job_id):
        asyncio.run(tail())
    return wait(cluster, job_id)


def wait(cluster: Cluster, job_id: str, poll_s: float = 1.0) -> JobDetails:
    while not (details := info(cluster, job_id)).status.is_terminal():
        time.sleep(poll_s)
    return details


def stop(cluster: Cluster, job_id: str) -> bool:
    """Ask the cluster to stop the job; False if it had already ended."""
    with cluster.calls(job_id):
        return cluster.client.stop_job(job_id)


def list_jobs(cluster: Cluster) -> list[JobDetails]:
    """Every submitted job on the cluster, oldest first."""
    with cluster.calls():
        jobs = [j for j in cluster.client.list_jobs() if j.submission_id]
    return sorted(jobs, key=lambda j: j.start_time or 0)


def run_dir(details: JobDetails) -> str:
    return (details.metadata or {}).get(RUN_DIR_KEY, "")


def failure(details: JobDetails, log_text: str) -> str:
    """Why a job did not succeed, in one line: dldr's own error line when its log has one."""
    job = details.submission_id
    if details.status == JobStatus.STOPPED:
        return f"job {job} was stopped; its run directory keeps every file completed before"
    errors = [line.removeprefix("dldr: error: ") for line in log_text.splitlines() if line.startswith("dldr: error: ")]
    message = (details.message or "").strip().splitlines()
    reason = errors[-1] if errors else message[-1] if message else f"see `dldr logs {job}`"
    return f"job {job} {details.status.value.lower()}: {reason}"


def when(ms: int | None) -> str:
    return datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S") if ms else "-"
