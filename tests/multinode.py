"""A Ray cluster of three worker nodes on this machine, and `dldr fit --workers 2` on it: unbroken,
with a node lost mid phase 1, and with a node lost mid phase 3.

Run by tests/test_multinode.py as ``python -m tests.multinode OUT.json WORK`` in a process of its
own: a process holds one Ray connection, and the test session's is the shared local instance.
Each node is a raylet of its own (1 logical CPU, its own temp dir under a private folder), the head
holds no CPUs, everything listens on 127.0.0.1 with token authentication on. A node is lost the
way a machine is: every process of it killed (``Cluster.remove_node``), here once the run's
metrics.jsonl shows an epoch of the phase, naming the node of rank 1. Writes what each run saw to
OUT.json: per epoch the node of each rank, when the node was killed and when the first epoch after
it was logged, and the checksums of the snapshots and the final weights.
"""

import json
import os
import secrets
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

# Ray's failure detection, tightened from 5 missed checks 3 s apart so a lost node is seen within seconds
FAST_DETECTION = {"health_check_period_ms": 500, "health_check_timeout_ms": 1000, "health_check_failure_threshold": 3}
FIT = [
    "--workers",
    "2",
    "--max-failures",
    "1",
    "--quiet",
    "--sample-epochs",
    "8",
    "--subspace-epochs",
    "8",
    "--subspace-batch-size",
    "128",
]


def _records(run_dir: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    except (OSError, ValueError):  # not written yet, or replaced as we read
        return []


class NodeKiller(threading.Thread):
    """Kills the node of ``rank`` once ``phase`` has logged ``epoch``, then notes the first epoch logged after."""

    def __init__(self, cluster, run_dir: Path, phase: str, epoch: int, rank: int = 1):
        super().__init__(daemon=True)
        self.cluster, self.run_dir, self.phase, self.epoch, self.rank = cluster, run_dir, phase, epoch, rank
        self.seen: dict = {}
        self.done = threading.Event()
        self.earlier = _records(run_dir)  # a re-run phase's old records are not its progress

    def run(self) -> None:
        while not self.done.is_set():
            records = [r for r in _records(self.run_dir) if r["phase"] == self.phase and r not in self.earlier]
            if records and records[-1]["epoch"] >= self.epoch:
                break
            time.sleep(0.05)
        else:
            return
        before = records[-1]
        victim = next(n for n in self.cluster.worker_nodes if n.node_id == before["nodes"][self.rank])
        self.cluster.remove_node(victim, allow_graceful=False)
        killed = time.monotonic()
        self.seen = {
            "killed_after_epoch": before["epoch"],
            "killed_node": victim.node_id,
            "nodes_before": before["nodes"],
        }
        while not self.done.is_set():  # the first epoch the restarted worker group logs
            after = [
                r for r in _records(self.run_dir) if r["phase"] == self.phase and r.get("nodes") != before["nodes"]
            ]
            if after:
                self.seen.update(
                    recovery_s=time.monotonic() - killed,
                    resumed_at_epoch=after[0]["epoch"],
                    nodes_after=after[0]["nodes"],
                )
                return
            time.sleep(0.05)


def _outcome(run_dir: Path) -> dict:
    from dldr.store import RunStore

    store = RunStore(str(run_dir))
    return {
        "records": _records(run_dir),
        "summary": store.read_json("summary.json"),
        "snapshots": {rel: store.checksum(rel) for rel in store.files("snapshots/")},
        "model": store.checksum("model.safetensors"),
    }


def main(out: str, work: str) -> None:
    base = tempfile.mkdtemp(prefix="dldr-nodes-", dir="/tmp")  # short: Ray puts sockets inside
    os.makedirs(f"{base}/ray")
    # RAY_TMPDIR: Ray's "current cluster" file goes here too, not into the machine's /tmp/ray
    os.environ.update(RAY_TMPDIR=base, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False  # every node on 127.0.0.1, as dldr's own local instance
    from ray.cluster_utils import Cluster

    from dldr.cli import main as dldr

    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 0,
            "node_ip_address": "127.0.0.1",
            "include_dashboard": False,
            "temp_dir": f"{base}/head",
            "_system_config": FAST_DETECTION,
        },
    )
    added = 0

    def add_node() -> None:
        nonlocal added
        cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1", temp_dir=f"{base}/node{added}")
        added += 1

    results: dict = {"head": cluster.head_node.node_id}
    try:
        for _ in range(3):
            add_node()
        cluster.wait_for_nodes()
        results["nodes"] = [n.node_id for n in cluster.worker_nodes]
        unbroken = Path(work) / "unbroken"
        started = time.monotonic()
        assert dldr(["fit", "--address", cluster.address, "--run-dir", str(unbroken), *FIT]) == 0
        results["unbroken"] = {**_outcome(unbroken), "seconds": time.monotonic() - started}

        lost = Path(work) / "node-lost-in-phase-1"
        killer = NodeKiller(cluster, lost, "sample", epoch=2)
        killer.start()
        started = time.monotonic()
        code = dldr(["fit", "--address", cluster.address, "--run-dir", str(lost), *FIT])
        killer.done.set()
        killer.join()
        results["phase_1"] = {**_outcome(lost), **killer.seen, "exit": code, "seconds": time.monotonic() - started}

        add_node()  # a node comes back, so phase 3 has three again
        cluster.wait_for_nodes()
        results["nodes_for_phase_3"] = [n.node_id for n in cluster.worker_nodes]
        lost = Path(work) / "node-lost-in-phase-3"
        shutil.copytree(unbroken, lost)
        killer = NodeKiller(cluster, lost, "train", epoch=2)
        killer.start()
        started = time.monotonic()
        code = dldr(["train", "--address", cluster.address, "--run-dir", str(lost), "--max-failures", "1", "--quiet"])
        killer.done.set()
        killer.join()
        results["phase_3"] = {**_outcome(lost), **killer.seen, "exit": code, "seconds": time.monotonic() - started}
    finally:
        Path(out).write_text(json.dumps(results, indent=1))
        cluster.shutdown()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
