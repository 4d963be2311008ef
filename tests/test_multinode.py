"""Several nodes: `dldr fit --workers 2` on a Ray cluster of three worker nodes on this machine (see
tests/multinode.py, which runs in a process of its own), the ranks on different nodes, and a node
lost mid phase 1 and mid phase 3 with --max-failures 1: the run resumes on the nodes left and ends
with the same snapshots, and the same final weights, as the unbroken run.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster_runs(tmp_path_factory):
    work = tmp_path_factory.mktemp("nodes")
    out = work / "out.json"
    done = subprocess.run(
        [sys.executable, "-m", "tests.multinode", str(out), str(work)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    for name in ("phase_1", "phase_3"):  # what the node-loss runs saw, in the test's output (pytest -s, or -rA)
        seen = results[name]
        print(
            f"{name}: rank 1's node {seen['killed_node'][:8]} killed after epoch {seen['killed_after_epoch']}; "
            f"ranks on {[n[:8] for n in seen['nodes_before']]} -> {[n[:8] for n in seen['nodes_after']]}; "
            f"epoch {seen['resumed_at_epoch']} logged {seen['recovery_s']:.1f} s after the kill; "
            f"{seen['seconds']:.0f} s in all"
        )
    return results


def _placements(records: list[dict], phase: str) -> list[list[str]]:
    return [r["nodes"] for r in records if r["phase"] == phase]


def test_the_ranks_run_on_different_nodes(cluster_runs):
    unbroken, nodes = cluster_runs["unbroken"], set(cluster_runs["nodes"])
    for phase in ("sample", "train"):
        placements = _placements(unbroken["records"], phase)
        assert len(placements) == 8
        for ranks in placements:
            assert len(ranks) == 2 and len(set(ranks)) == 2 and set(ranks) <= nodes, ranks
    assert cluster_runs["head"] not in nodes  # the head holds no CPUs: no rank runs there


@pytest.mark.parametrize("phase, name", [("sample", "phase_1"), ("train", "phase_3")])
def test_a_node_lost_mid_phase_moves_its_rank_and_changes_nothing(cluster_runs, phase, name):
    run, unbroken = cluster_runs[name], cluster_runs["unbroken"]
    assert run["exit"] == 0
    killed = run["killed_node"]
    assert run["nodes_before"][1] == killed and killed not in run["nodes_after"]
    assert len(set(run["nodes_after"])) == 2
    placements = _placements(run["records"], phase)
    assert [r["epoch"] for r in run["records"] if r["phase"] == phase] == list(range(1, 9))
    # the restarted group resumed from the last checkpoint Ray Train had registered (or from the start)
    assert killed not in placements[-1] and 1 <= run["resumed_at_epoch"] <= 8
    # the resumed run ends where the unbroken one did
    assert run["snapshots"] == unbroken["snapshots"]
    assert len(run["snapshots"]) == 2 * unbroken["summary"]["phases"]["sample"]["snapshots"]
    assert run["model"] == unbroken["model"]
    assert run["summary"]["test_accuracy"] == unbroken["summary"]["test_accuracy"]
