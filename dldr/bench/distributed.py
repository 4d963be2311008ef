"""1 against 2 Ray Train workers on the same seed: wall time per phase, and how far the results agree.

Both runs use the same global batch, so with exact arithmetic they would follow the same
trajectory; DDP's all-reduce sums in another order, so they differ by rounding. The basis
agreement is the largest principal angle between the two bases (rank r of the 2-worker run
kept rows r of it), plus the eigenvalues and the test accuracies.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from dldr import phases
from dldr.basis import SHARDS
from dldr.bench import report
from dldr.config import Config
from dldr.store import RunStore

PHASES = ("sample", "basis", "train")
PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {},  # the defaults: digits, MLP, 10 + 10 epochs, d = 40
    "smoke": {"sample_epochs": 1, "snapshot_every": 1, "dim": 4, "subspace_epochs": 1},
}
WORKERS = (1, 2)


def _basis(store: RunStore) -> np.ndarray:
    """P as phase 3 kept it, rank after rank."""
    return np.concatenate([store.load_array(rel) for rel in store.files(SHARDS)])


def run(preset: str, work: Path) -> tuple[dict, dict, str, Figure]:
    from dldr import ray_train  # the one benchmark that needs Ray

    results: dict[str, Any] = {}
    with ray_train.cluster(""):
        for workers in WORKERS:
            cfg = Config.from_dict({**PRESETS[preset], "workers": workers, "run_dir": str(work / f"workers-{workers}")})
            run = phases.start_run(cfg, progress=False)
            walls = report.timed_phases(run, PHASES)
            summary = run.log.summary["phases"]
            results[str(workers)] = {
                "wall_seconds": walls,
                "phase_seconds": {name: summary[name]["seconds"] for name in PHASES},
                "sample_test_accuracy": summary["sample"]["test_accuracy"],
                "test_accuracy": summary["train"]["test_accuracy"],
            }
            print(
                f"{workers} worker(s): "
                + ", ".join(f"{n} {walls[n]:.1f} s" for n in PHASES)
                + f"; test accuracy {summary['train']['test_accuracy']:.4f}",
                flush=True,
            )
    stores = [RunStore(str(work / f"workers-{w}")) for w in WORKERS]
    bases = [_basis(s) for s in stores]
    q = [np.linalg.qr(b.astype(np.float64))[0] for b in bases]
    cosines = np.linalg.svd(q[0].T @ q[1], compute_uv=False)
    eigvals = [s.load_array("basis/eigvals.npy")[: bases[0].shape[1]] for s in stores]
    results["agreement"] = {
        "largest_principal_angle": float(np.arccos(np.clip(cosines.min(), -1.0, 1.0))),
        "eigval_max_rel_diff": float(np.max(np.abs(eigvals[0] - eigvals[1]) / eigvals[0])),
        "test_accuracy_diff": results["2"]["test_accuracy"] - results["1"]["test_accuracy"],
    }
    return PRESETS[preset], results, _markdown(results), _figure(results)


def _markdown(results: dict[str, Any]) -> str:
    rows = [
        [
            w,
            *(f"{results[w]['wall_seconds'][n]:.1f} ({results[w]['phase_seconds'][n]:.1f})" for n in PHASES),
            f"{results[w]['sample_test_accuracy']:.4f}",
            f"{results[w]['test_accuracy']:.4f}",
        ]
        for w in map(str, WORKERS)
    ]
    a = results["agreement"]
    header = ["workers", *(f"{n}: wall s (in phase s)" for n in PHASES), "after sampling", "final test accuracy"]
    return (
        report.table(header, rows)
        + f"\nBasis agreement: largest principal angle {a['largest_principal_angle']:.2e} rad, "
        f"max relative eigenvalue difference {a['eigval_max_rel_diff']:.2e}, "
        f"test accuracy difference {100 * a['test_accuracy_diff']:+.2f} points.\n"
    )


def _figure(results: dict[str, Any]) -> Figure:
    fig = Figure(figsize=(6, 3.5))
    ax = fig.add_subplot(1, 1, 1)
    x = np.arange(len(PHASES))
    for i, w in enumerate(map(str, WORKERS)):
        ax.bar(x + 0.4 * i, [results[w]["wall_seconds"][n] for n in PHASES], 0.4, label=f"{w} worker(s)")
    ax.set_xticks(x + 0.2, PHASES)
    ax.set(ylabel="wall seconds (with worker start-up)")
    ax.legend()
    ax.grid(alpha=0.3, axis="y")
    return fig
