"""Experiment tracking: every epoch of every phase to MLflow and TensorBoard, besides metrics.jsonl.

One command (``dldr fit``: all three phases) is one MLflow run. The driver opens it and logs the
config as parameters (``start``); the process that owns the run's log in each phase (rank 0 of
the Ray Train workers, the driver for phase 2) logs every record as metrics on one step axis
across phases, epochs of phase 1 first, then phase 3's after them (``Trackers``); the driver
logs the plots, the basis report and the summary as artifacts and ends the run (``finish``).
TensorBoard's event files go into the run directory's ``tensorboard/`` folder, each process its
own file, written through the store like every other file (so to S3 too).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import posixpath
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from dldr.config import Config
from dldr.errors import DldrError
from dldr.store import TENSORBOARD, RunStore

EXPERIMENT = "dldr"  # the MLflow experiment, unless MLFLOW_EXPERIMENT_NAME names another
# the files the driver logs as artifacts at the end of a command, where the run directory holds them
ARTIFACTS = ("summary.json", "basis/report.json", "plots/curves.png", "plots/explained_variance.png")


@dataclass
class Tracking:
    """Where a command's records go besides metrics.jsonl; the driver passes it to every phase's rank 0."""

    trackers: tuple[str, ...] = ()
    mlflow_uri: str = ""
    mlflow_run_id: str = ""


def check(cfg: Config) -> None:
    """The tracker packages, before any work: a missing one is one line that names its extra."""
    for name in cfg.trackers:
        try:
            if name == "mlflow":
                import mlflow  # noqa: F401

                logging.getLogger("mlflow").setLevel(logging.WARNING)  # its database's set-up notes
            else:
                import tensorboard  # noqa: F401
        except ImportError:
            raise DldrError(f'--tracker {name} needs the {name} package; pip install "dldr[{name}]"') from None


def _mlflow_uri() -> str:
    """MLFLOW_TRACKING_URI, or MLflow's own default (a database in the working folder) made absolute,
    so that Ray workers, whose working folders differ, log to the same store."""
    import mlflow

    uri = mlflow.get_tracking_uri()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + os.path.abspath(uri.removeprefix("sqlite:///"))
    return uri


def start(cfg: Config, store: RunStore, command: str) -> Tracking:
    """Open the command's MLflow run with the config as its parameters (where --tracker asks for MLflow);
    ``check`` has found the packages before any work."""
    if "tensorboard" in cfg.trackers:
        _text(store, "config", cfg.to_yaml())
    if "mlflow" not in cfg.trackers:
        return Tracking(cfg.trackers)
    from mlflow.entities import Param
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    uri = _mlflow_uri()
    try:
        client = MlflowClient(uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", EXPERIMENT)
        experiment = client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(name)
        run = client.create_run(
            experiment_id,
            run_name=posixpath.basename(store.url.rstrip("/")),
            tags={"dldr.run_dir": store.url, "dldr.command": command},
        )
        params = [Param(k, str(v)) for k, v in dataclasses.asdict(cfg).items()]
        client.log_batch(run.info.run_id, params=params)
    except MlflowException as e:
        raise DldrError(
            f"--tracker mlflow cannot log to {uri} ({str(e).splitlines()[0]}); check "
            "MLFLOW_TRACKING_URI, or leave it unset to log to ./mlflow.db"
        ) from None
    return Tracking(cfg.trackers, uri, run.info.run_id)


def finish(tracking: Tracking, store: RunStore, failed: bool) -> None:
    """Log the plots, the basis report and the summary as the MLflow run's artifacts, and end it;
    the summary as TensorBoard text."""
    store.reload()
    if "tensorboard" in tracking.trackers and store.exists("summary.json"):
        _text(store, "summary", store.read_bytes("summary.json").decode())
    if not tracking.mlflow_run_id:
        return
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking.mlflow_uri)
    with tempfile.TemporaryDirectory() as folder:
        for rel in ARTIFACTS:
            if store.exists(rel):
                path = os.path.join(folder, posixpath.basename(rel))
                with open(path, "wb") as f:
                    f.write(store.read_bytes(rel))
                client.log_artifact(tracking.mlflow_run_id, path, posixpath.dirname(rel) or None)
    client.set_terminated(tracking.mlflow_run_id, "FAILED" if failed else "FINISHED")


def _text(store: RunStore, tag: str, text: str) -> None:
    trackers = Trackers(Tracking(("tensorboard",)), store)
    trackers.text(tag, text)
    trackers.close()


def step(phase: str, record: dict[str, Any], sample_epochs: int) -> int:
    """The record's place on the one step axis of a run: phase 1's epochs, then phase 3's after them
    (phase 2 at the end of phase 1)."""
    return record.get("epoch", 0) if phase == "sample" else sample_epochs + record.get("epoch", 0)


def scalars(phase: str, record: dict[str, Any]) -> dict[str, float]:
    """A record's numbers, named ``phase/key`` (the step and epoch are the axis, not metrics)."""
    return {
        f"{phase}/{k}": float(v)
        for k, v in record.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("phase", "epoch", "step")
    }


class Trackers:
    """The trackers of the process that owns a phase's log: each record to MLflow and TensorBoard."""

    def __init__(self, tracking: Tracking, store: RunStore):
        self.tracking, self.store = tracking, store
        self._client = None
        self._writer = None
        self._events: str | None = None
        if tracking.mlflow_run_id:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking.mlflow_uri)
        if "tensorboard" in tracking.trackers:
            from torch.utils.tensorboard import SummaryWriter

            self._events = tempfile.mkdtemp(prefix="dldr-tensorboard-")
            self._writer = SummaryWriter(self._events)

    def log(self, phase: str, record: dict[str, Any], at: int) -> None:
        values = scalars(phase, record)
        if self._client is not None:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            self._client.log_batch(
                self.tracking.mlflow_run_id, metrics=[Metric(k, v, now, at) for k, v in values.items()]
            )
        if self._writer is not None:
            for k, v in values.items():
                self._writer.add_scalar(k, v, at)
            self._writer.flush()
            self._copy_events()

    def text(self, tag: str, text: str) -> None:
        """Text for TensorBoard's text tab (the config, a summary); MLflow has it as parameters and artifacts."""
        if self._writer is not None:
            self._writer.add_text(tag, f"```\n{text}\n```")
            self._writer.flush()
            self._copy_events()

    def _copy_events(self) -> None:
        """This process's event file into the run directory, whole, as every file there is written."""
        for name in os.listdir(self._events):
            with open(os.path.join(self._events, name), "rb") as f:
                self.store.write_bytes(f"{TENSORBOARD}/{name}", f.read())

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._copy_events()
            with contextlib.suppress(OSError):
                for name in os.listdir(self._events):
                    os.remove(os.path.join(self._events, name))
                os.rmdir(self._events)
            self._writer = None
