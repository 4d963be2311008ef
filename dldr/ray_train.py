"""The one module that knows Ray: a command's phases in one Ray Train run.

The driver connects to a cluster (``--address``, RAY_ADDRESS) or starts a local instance that
listens on loopback only, checks that the cluster can place the workers and that every node
sees the run directory, and then runs one ``TorchTrainer`` whose workers call the same
``dldr.phases`` functions as the in-process path, one phase after another, with a ``TorchComm``
over the process group Ray Train sets up (Gloo on CPU, NCCL on GPU) and a ``RaySession`` for
progress and checkpoints. Phase 2 runs on the same workers: each reads its own snapshot shard,
and the shards' Grams are gathered over the process group (``dldr.basis.shard_map``). A
worker group that fails restarts from its last checkpoint: inside phase 1 at its last epoch,
after it at the last phase that finished (phase 3 resumes from subspace/state.pt).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import ray
import ray.train
import torch
from ray._private.authentication.authentication_token_setup import (
    maybe_enable_token_auth_if_token_available,
)
from ray.train.torch import TorchTrainer
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from tqdm.auto import tqdm

from dldr import phases
from dldr.comm import TorchComm
from dldr.config import Config
from dldr.errors import DldrError
from dldr.runlog import RunLog
from dldr.store import CONFIG, RunStore
from dldr.tracking import Tracking

CHECKPOINTS = "checkpoints"
PROGRESS = "progress.json"  # in each Ray Train checkpoint: see ``RaySession``
CONNECT_TIMEOUT_S = 5.0
# Ray Train's settings for a local instance dldr starts (a cluster keeps its own): ray.train.report
# waits for the controller's next poll of the workers (every 2 s by default), which with a report
# per epoch dominates short epochs; a preemption watcher is an actor process of its own, and
# there is no one to preempt a local instance.
LOCAL_TRAIN_SETTINGS = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


@dataclass
class FailureInjection:
    """Kill the worker of ``rank`` (SIGKILL) after SGD step ``step``, once per ``marker`` file.

    For tests and chaos drills: a real process death that Ray Train must recover from.
    """

    rank: int
    step: int
    marker: str


# ---- the cluster -------------------------------------------------------------------------------


def _loopback_only() -> None:
    """Make a local instance bind and advertise 127.0.0.1 only, for this process and its children."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    # Ray reads the variable when it is imported, which has happened by now.
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


def _check_reachable(address: str) -> None:
    if address.startswith("ray://"):
        raise DldrError(
            f"--address {address} is a Ray Client address; give the cluster's GCS address "
            "host:port (6379 by default) instead"
        )
    if address.startswith(("http://", "https://")):
        raise DldrError(
            f"--address {address} (or RAY_ADDRESS) is a dashboard address, which `dldr submit` takes; "
            "`dldr fit` takes the cluster's GCS address host:port (6379 by default)"
        )
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except (OSError, ValueError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e) or type(e).__name__
        raise DldrError(
            f"cannot reach a Ray cluster at {address} ({reason}); start one with `ray start --head`, "
            "fix --address / RAY_ADDRESS, or leave both out to use a local Ray instance"
        ) from None


@contextlib.contextmanager
def cluster(address: str, report: bool = True) -> Iterator[None]:
    """Connect to the cluster at ``address`` (or RAY_ADDRESS), or start and stop a local one.

    An existing connection of this process (a notebook, the test session) is used as it is.
    ``report``: Ray's forwarded tracebacks and notes go to a log file (``_ray_report``), not here.
    """
    if ray.is_initialized():
        yield
        return
    address = address or os.environ.get("RAY_ADDRESS", "")
    # Ray turns token authentication on for a new local instance, and notes that it did
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    with contextlib.ExitStack() as cleanup:
        try:
            if address and address != "auto":
                _check_reachable(address)
                # Ray uses a token found in RAY_AUTH_TOKEN(_PATH) or ~/.ray/auth_token for a local
                # cluster only; a cluster given by address gets it the same way here.
                maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
                ray.init(address=address, configure_logging=False, log_to_driver=True)
            elif address:
                ray.init(address="auto", configure_logging=False, log_to_driver=True)
            else:
                _loopback_only()
                for key, value in LOCAL_TRAIN_SETTINGS.items():
                    os.environ.setdefault(key, value)
                temp_dir = tempfile.mkdtemp(prefix="dldr-ray-", dir="/tmp")  # short: Ray puts sockets inside
                cleanup.callback(shutil.rmtree, temp_dir, ignore_errors=True)
                ray.init(
                    address="local",
                    _temp_dir=temp_dir,
                    include_dashboard=False,  # 2 s of start-up; a cluster of its own has one
                    configure_logging=False,
                    log_to_driver=True,
                )
        except (ConnectionError, ray.exceptions.AuthenticationError) as e:
            first = str(e).strip().splitlines()[0]
            raise DldrError(
                f"cannot connect to the Ray cluster at {address or 'a new local instance'}: {first}; "
                "check the address and that RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH holds the "
                "cluster's token"
            ) from None
        cleanup.callback(ray.shutdown)
        if report:
            cleanup.enter_context(_ray_report())
        yield


@dataclass
class _Report:
    """The log file of what Ray forwards other than the workers' own output: tracebacks of failed
    workers, the controller's and the raylet's notes. It is kept when an error line names it, or
    when a run that ended well had worker errors on the way; otherwise removed."""

    path: Path
    named: bool = False


_report: _Report | None = None  # that of the command now running, if it runs its own connection


@contextlib.contextmanager
def _ray_report() -> Iterator[None]:
    """Send what Ray forwards from the cluster to a ``_Report``, except the workers' own output lines
    (rank 0's progress), which still reach this terminal: a failed worker is one line of dldr's,
    not forty of Ray's."""
    global _report
    from ray._private import worker
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    fd, name = tempfile.mkstemp(prefix="dldr-ray-", suffix=".log")
    log = os.fdopen(fd, "w", buffering=1)
    errors = []
    to_terminal = worker.print_to_stdstream

    def handle(data: dict[str, Any], ignore_prefix: bool = False) -> None:
        if not data.get("is_err") and data.get("pid") not in ("raylet", "autoscaler", "gcs_server"):
            to_terminal(data, ignore_prefix=ignore_prefix)
            return
        source = str(data.get("actor_name") or data.get("task_name") or data.get("pid"))
        for line in data.get("lines", []):
            log.write(f"({source} pid={data.get('pid')}) {line}\n")
            # Ray Train's workers and controller; not Ray's own helpers, which on a machine with two
            # local instances trace their confusion and carry on
            if source.startswith(("RayTrainWorker", "TrainController")) and ("Traceback" in line or "Error" in line):
                errors.append(line)

    # Ray's private seams: the handler of forwarded worker output, and the printer of the raylet's messages
    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("ray_print_logs", handle)
    worker.print_to_stdstream = handle
    report = _report = _Report(Path(name))
    try:
        yield
    finally:
        _report = None
        worker.print_to_stdstream = to_terminal
        dispatcher.remove_handler("ray_print_logs")
        log.close()
        if errors and sys.exc_info()[0] is None:
            print(
                f"dldr: the run ended well, but Ray reported errors on the way (a worker group that fails "
                f"resumes from its last checkpoint); Ray's report: {name}",
                file=sys.stderr,
            )
        elif not report.named:
            os.remove(name)


def check_placement(cfg: Config) -> None:
    """Refuse what Ray would wait for forever: more workers than the cluster's CPUs or GPUs."""
    total = ray.cluster_resources()
    cpus = total.get("CPU", 0)
    if cpus < cfg.workers * cfg.cpus_per_worker:
        raise DldrError(
            f"--workers {cfg.workers} with {cfg.cpus_per_worker:g} CPUs each needs "
            f"{cfg.workers * cfg.cpus_per_worker:g} CPUs but the Ray cluster has {cpus:g}; "
            "lower --workers or --cpus-per-worker, or add nodes"
        )
    if cfg.device == "cuda":
        per_worker = _gpus_per_worker(cfg)
        gpus = total.get("GPU", 0)
        if gpus < cfg.workers * per_worker:
            raise DldrError(
                f"--workers {cfg.workers} with {per_worker:g} GPUs each needs "
                f"{cfg.workers * per_worker:g} GPUs but the Ray cluster has {gpus:g}; "
                "lower --workers or --gpus-per-worker, or use --device cpu"
            )


def _gpus_per_worker(cfg: Config) -> float:
    return cfg.gpus_per_worker or 1.0


@ray.remote(num_cpus=0)
def _config_checksum(location: str) -> str | None:
    store = RunStore(location, owner=False)
    return store.checksum(CONFIG) if store.exists(CONFIG) else None


def _check_visible(store: RunStore) -> None:
    """Every node must see the run directory the driver wrote (Ray's storage rule, checked up front)."""
    expected = store.checksum(CONFIG)
    nodes = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0]
    seen = ray.get(
        [
            _config_checksum.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
            ).remote(store.location)
            for n in nodes
        ]
    )
    for node, checksum in zip(nodes, seen):
        if checksum != expected:
            raise DldrError(
                f"the Ray workers on node {node['NodeManagerAddress']} do not see the run directory "
                f"{store.url} that this process wrote; use a --run-dir every node can reach "
                "(a shared file system, or s3://bucket/run)"
            )


# ---- the phases: one Ray Train run -------------------------------------------------------------


class _EpochLines:
    """tqdm's interface, printing one line per epoch: Ray forwards worker output line by line."""

    def __init__(self, desc: str, total: int):
        self.desc, self.total, self.n = desc, total, 0
        self.start = time.perf_counter()

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, **values: str) -> None:
        shown = ", ".join(f"{k}={v}" for k, v in values.items())
        print(
            f"{self.desc}: {self.n}/{self.total} steps, {shown}, {time.perf_counter() - self.start:.1f} s", flush=True
        )

    def __enter__(self) -> _EpochLines:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


class RaySession(phases.Session):
    """Progress and checkpoints of the phases on a Ray Train worker.

    Every checkpoint holds ``progress.json``: the phase it was taken in and the phases this Ray
    Train run has finished, so that a restarted worker group skips those and resumes phase 1 from
    the state saved with its last epoch.
    """

    def __init__(self, rank: int, failure: FailureInjection | None = None):
        self.rank = rank
        self.failure = failure if failure and failure.rank == rank else None
        self.phase = ""
        self.completed: list[str] = []
        self._saved: tuple[str, dict[str, Any]] | None = None  # (phase, state) of the checkpoint resumed from
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as folder:
                progress = json.loads((Path(folder) / PROGRESS).read_text())
                self.completed = list(progress["completed"])
                if (Path(folder) / "state.pt").exists():
                    self._saved = (
                        progress["phase"],
                        {
                            "shared": torch.load(Path(folder) / "state.pt", weights_only=True),
                            "rank": torch.load(Path(folder) / f"rank-{self.rank:05d}.pt", weights_only=True),
                        },
                    )

    def bar(self, desc: str, total: int, enabled: bool) -> Any:
        return _EpochLines(desc, total) if enabled else tqdm(total=total, disable=True)

    def restore(self) -> dict[str, Any] | None:
        return self._saved[1] if self._saved and self._saved[0] == self.phase else None

    def report(self, metrics: dict[str, Any], state: dict[str, Any] | None = None) -> None:
        if state is not None:  # metrics alone go to metrics.jsonl and the trackers, not to Ray
            self._checkpoint(metrics, f"{self.phase}-epoch-{metrics['epoch']:05d}", state)

    def finished(self, phase: str) -> None:
        """Record that ``phase`` ended, so that a restarted worker group goes on after it."""
        self.completed.append(phase)
        self._checkpoint({"finished": phase}, f"{phase}-finished")

    def _checkpoint(self, metrics: dict[str, Any], name: str, state: dict[str, Any] | None = None) -> None:
        with tempfile.TemporaryDirectory() as folder:
            if state is not None:
                if self.rank == 0:
                    torch.save(state["shared"], Path(folder) / "state.pt")
                torch.save(state["rank"], Path(folder) / f"rank-{self.rank:05d}.pt")
            if self.rank == 0:
                (Path(folder) / PROGRESS).write_text(json.dumps({"phase": self.phase, "completed": self.completed}))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder), checkpoint_dir_name=name)

    def node(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def after_step(self, step: int) -> None:
        if self.failure and step == self.failure.step and not os.path.exists(self.failure.marker):
            Path(self.failure.marker).touch()
            os.kill(os.getpid(), signal.SIGKILL)


def _worker_loop(config: dict[str, Any]) -> None:
    """What every Ray Train worker runs: the command's phases, on this worker's rank of the process group."""
    logging.getLogger().setLevel(logging.WARNING)  # Ray Train logs every report at INFO
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL's object collectives use the current device
    comm = TorchComm(device)
    session = RaySession(comm.rank, config["failure"])
    run = phases.Run(
        Config.from_dict(config["config"]),
        RunStore(config["location"], owner=comm.rank == 0),
        comm=comm,
        progress=config["progress"],
        device=device,
        session=session,
        tracking=Tracking(**config["tracking"]),
    )
    names = config["phases"]
    for name in names:
        if name in session.completed:
            continue
        session.phase = name
        phases.PHASE_FUNCTIONS[name](run)
        if name != names[-1]:
            run.barrier()  # rank 0 has entered the phase's files in the manifest
            run.store.reload()
            session.finished(name)


def _worker_error(error: Exception, phase: str, run_dir: str) -> DldrError:
    """The user-facing error among the workers' failures: a DldrError if one raised it."""
    failures = list(getattr(error, "worker_failures", {}).values()) or [error]
    for failure in failures:
        cause: BaseException | None = failure
        while cause is not None:
            inner = getattr(cause, "cause", None)  # a RayTaskError wraps the exception the task raised
            if isinstance(inner, BaseException) and inner is not cause:
                cause = inner
            elif isinstance(cause, DldrError):
                return DldrError(str(cause))
            else:
                cause = cause.__cause__
    lines = [[line.strip() for line in str(f).splitlines() if line.strip()] for f in failures]
    # a killed worker fails its group twice: it died, and its peers lost their connection to it
    died = next(
        (line for text in lines for line in text if "worker process has died" in line or "actor died" in line.lower()),
        None,
    )
    if died:
        what = f"a Ray Train worker died ({died.split('. ')[0].rstrip('.')})"
    else:
        what = f"it failed on the workers ({lines[0][-1].split('. ')[0] if lines[0] else type(failures[0]).__name__})"
    report = "; Ray's report is in the Ray session's logs"
    if _report is not None:
        _report.named = True
        report = f"; Ray's report: {_report.path}"
    return DldrError(
        f"phase {phase}: {what}; give --max-failures N to let the phase restart from its last "
        f"checkpoint, or run `dldr {phase} --run-dir {run_dir}` again{report}"
    )


def run_phases(run: phases.Run, names: list[str], failure: FailureInjection | None = None) -> None:
    """Run the phases ``names`` of ``run``, in order, in one Ray Train run on the connected cluster
    (see ``cluster``)."""
    cfg = run.cfg
    check_placement(cfg)
    _check_visible(run.store)
    use_gpu = cfg.device == "cuda"
    per_worker = {"CPU": cfg.cpus_per_worker, **({"GPU": _gpus_per_worker(cfg)} if use_gpu else {})}
    scaling = ray.train.ScalingConfig(num_workers=cfg.workers, use_gpu=use_gpu, resources_per_worker=per_worker)
    command = "fit" if len(names) > 1 else names[0]
    run_config = ray.train.RunConfig(
        name=f"{command}-{time.strftime('%Y%m%d-%H%M%S')}",
        storage_path=f"{run.store.location}/{CHECKPOINTS}",
        failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        logging_config=ray.train.LoggingConfig(log_level="WARNING"),
    )
    loop_config = {
        "config": asdict(cfg),
        "location": run.store.location,
        "phases": names,
        "progress": run.progress,
        "failure": failure,
        "tracking": asdict(run.tracking),
    }
    trainer = TorchTrainer(_worker_loop, train_loop_config=loop_config, scaling_config=scaling, run_config=run_config)
    try:
        trainer.fit()
    except ray.train.TrainingFailedError as e:
        run.store.reload()
        finished = RunLog(run.store).summary["phases"]
        failed = next((name for name in names if name not in finished), names[0])
        raise _worker_error(e, failed, run.store.url) from None
    finally:
        run.store.reload()
        run.log = RunLog(run.store, run.tracking)
