"""metrics.jsonl and summary.json: what each phase of a run logged and what it achieved.

Phases run in order, so re-running one (``dldr basis --dim 20``) drops what it and the phases
after it had logged: the log always describes the artifacts in the run directory. Only the
process that owns the run's manifest (rank 0) writes the log; other ranks keep it in memory.
"""

from __future__ import annotations

import json
from typing import Any

from dldr.errors import DldrError
from dldr.store import RunStore
from dldr.tracking import Trackers, Tracking, step

PHASES = ("sample", "basis", "train")
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"


class RunLog:
    """The log of a run. A damaged metrics.jsonl or summary.json is read as an empty log and
    reported by ``check``, which the phases after phase 1 call: phase 1 writes both anew.
    The owner also sends each record to the command's trackers (``dldr.tracking``)."""

    def __init__(self, store: RunStore, tracking: Tracking | None = None):
        self.store = store
        self.tracking = tracking or Tracking()
        self._trackers: Trackers | None = None
        self.records: list[dict[str, Any]] = []
        self.summary: dict[str, Any] = {"test_accuracy": None, "phases": {}}
        self.damage: str | None = None
        try:
            if store.exists(METRICS):
                self.records = _records(store.read_bytes(METRICS))
            if store.exists(SUMMARY):
                self.summary = _summary(store.read_bytes(SUMMARY))
        except (ValueError, TypeError) as e:  # JSON and Unicode errors are ValueErrors
            self.records, self.summary = [], {"test_accuracy": None, "phases": {}}
            self.damage = (
                f"the log of {store.url} is damaged ({e}); re-run `dldr sample --run-dir {store.url}`, "
                "which writes it anew"
            )
        except DldrError as e:
            self.damage = str(e)

    def check(self) -> None:
        """Refuse a damaged log: a phase after phase 1 reads what the phases before it achieved."""
        if self.damage:
            raise DldrError(self.damage)

    def begin(self, phase: str, resume_after_epoch: int = 0) -> None:
        """Drop what this phase and later ones logged, except the epochs a resumed phase keeps."""
        stale = set(PHASES[PHASES.index(phase) :])
        self.records = [
            r
            for r in self.records
            if r["phase"] not in stale or (r["phase"] == phase and 0 < r.get("epoch", 0) <= resume_after_epoch)
        ]
        self.summary["phases"] = {k: v for k, v in self.summary["phases"].items() if k not in stale}
        if self.store.owner:  # a phase that stops now must not look finished
            self._write_metrics()
            self._write_summary()

    def _write_metrics(self) -> None:
        self.store.write_bytes(METRICS, "".join(json.dumps(r) + "\n" for r in self.records).encode())

    def _write_summary(self) -> None:
        phases = self.summary["phases"]
        last = next((phases[p] for p in reversed(PHASES) if "test_accuracy" in phases.get(p, {})), {})
        self.summary["test_accuracy"] = last.get("test_accuracy")
        self.store.write_json(SUMMARY, self.summary)

    def log(self, phase: str, **values: Any) -> None:
        self.records.append({"phase": phase, **values})
        if self.store.owner:
            self._write_metrics()
            if self.tracking.trackers:
                self._trackers = self._trackers or Trackers(self.tracking, self.store)
                sample_epochs = self.summary["phases"].get("sample", {}).get("epochs", 0)
                self._trackers.log(phase, values, step(phase, values, sample_epochs))

    def finish(self, phase: str, result: dict[str, Any]) -> None:
        self.summary["phases"][phase] = result
        if self.store.owner:
            self._write_summary()
        if self._trackers is not None:
            self._trackers.close()
            self._trackers = None


def _records(data: bytes) -> list[dict[str, Any]]:
    records = [json.loads(line) for line in data.decode().splitlines()]
    for number, record in enumerate(records, 1):
        if not isinstance(record, dict) or record.get("phase") not in PHASES:
            raise TypeError(f"line {number} of {METRICS} is not the record of a phase")
    return records


def _summary(data: bytes) -> dict[str, Any]:
    summary = json.loads(data)
    phases = summary.get("phases") if isinstance(summary, dict) else None
    if not isinstance(phases, dict) or not all(k in PHASES and isinstance(v, dict) for k, v in phases.items()):
        raise TypeError(f"{SUMMARY} is not a summary of phases")
    return summary
