"""A large model through the whole pipeline on a small machine, with P in float32 and in bfloat16.

ViT-B/16 (85.8M parameters) on synthetic 224 px images: phase 1 long enough for d + 1
snapshots, phase 2, then a few P-BFGS steps, once with 1 shard (in-process, in a fresh process)
and once with 2 (two Ray Train workers). Phase 3 then runs again on the
same basis with ``--basis-dtype bf16``. Each phase reports, per rank, its peak resident memory
and the bytes of snapshots and of P_r it held (summary.json's ``memory``).

The naive approach for the same sizes is computed, not run (it does not fit): phase 2 stacks the
t x D trajectory and takes its dense SVD, whose U is as large again (benchmarks/README.md, basis:
11.63 GiB peak at t x D x 4 = 5.72 GiB), and phase 3 holds the whole D x d P in one process.

What bf16 P costs is measured on rank 0's rows of the 2-shard float32 basis and a real gradient
at w_start: the projection P^T g and the lift P c against float64, and their time. Its accuracy
is measured on real data: the same phases 1 and 2, phase 3 with float32 and with bfloat16 P.
"""

from __future__ import annotations

import shutil
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from dldr.bench import report

GB = 1e9
PHASES = ("sample", "basis", "train")
DTYPES = ("fp32", "bf16")
NAIVE_SVD_FACTOR = 2  # the dense SVD's peak over the stacked trajectory's bytes (basis: 11.63 GiB / 5.72 GiB)


@dataclass
class Preset:
    config: dict[str, Any]  # the large run
    shards: tuple[int, ...]
    real: list[dict[str, Any]] = field(default_factory=list)  # fp32 against bf16 P on real data
    timing_repeats: int = 3


_VIT = {
    "model": "vit_base_patch16_224",
    "data": "synthetic:3x224x224:10:80",
    "batch_size": 2,
    "sample_epochs": 1,
    "snapshot_every": 1,
    "dim": 40,
    "subspace_batch_size": 8,
    "subspace_epochs": 1,
    "loader_workers": 0,
}
_SMOKE = {"model": "mlp", "data": "digits", "sample_epochs": 1, "snapshot_every": 1, "dim": 4, "subspace_epochs": 1}
PRESETS = {
    # real data at the README's defaults; Fashion-MNIST's MLP at the lr wallclock's grid picked
    "cpu": Preset(
        _VIT, (1, 2), [{"model": "mlp", "data": "digits"}, {"model": "mlp", "data": "fashion-mnist", "lr": 0.05}]
    ),
    "smoke": Preset(_SMOKE, (1, 2), [_SMOKE], timing_repeats=1),
}


def _phases(config: dict[str, Any], names: tuple[str, ...], overrides: dict[str, Any]) -> dict[str, Any]:
    """Run ``names`` of the run at ``config["run_dir"]`` (a new one when ``names`` starts with sample) in
    this process, or on the connected Ray cluster with --workers N; the summary and each phase's wall time."""
    from dldr import phases
    from dldr.config import Config

    if names[0] == "sample":
        run = phases.start_run(Config.from_dict(config), progress=False)
    else:
        run = phases.open_run(config["run_dir"], overrides, progress=False)
    walls = report.timed_phases(run, names)
    return {"summary": run.log.summary["phases"], "wall_seconds": walls}


def _measured_phases(config: dict[str, Any], names: tuple[str, ...], overrides: dict[str, Any]) -> dict[str, Any]:
    """``_phases`` in a fresh process when in-process (its peak is then this run's alone), here with Ray."""
    if config["workers"]:
        return _phases(config, names, overrides)
    return report.in_fresh_process(_phases, config, names, overrides)


def _figures(result: dict[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    """Per phase: seconds, and per rank the peak resident memory and the bytes of snapshots and P_r held."""
    out = {}
    for name in names:
        phase = result["summary"][name]
        out[name] = {
            "seconds": phase["seconds"],
            "wall_seconds": result["wall_seconds"][name],
            "memory": phase["memory"],
        }
    return out


def projection_error(run_dir: str, repeats: int) -> dict[str, Any]:
    """P_0^T g and P_0 c with rank 0's float32 rows and with the same rows in bfloat16 (rounded as phase 3
    rounds them), against float64, and their time; g is the gradient at w_start on phase 3's first batch,
    c the unit vector along P_0^T g."""
    import torch

    from dldr import phases
    from dldr.basis import shard_path, snapshot_rows
    from dldr.params import FlatParams, shard_slices, trainable
    from dldr.subspace import Subspace

    run = phases.open_run(run_dir, {}, progress=False)
    store, cfg = run.store, run.cfg
    shards = store.snapshot_shards()
    data = phases.load_data(cfg)
    model = phases.build_model(run, data)
    flat = FlatParams(trainable(model))
    flat.set(torch.from_numpy(snapshot_rows(store, 0 if cfg.start == "first" else -1, slice(0, flat.numel))))
    x, y = next(iter(data.train_batches(cfg.train_batch_size(len(data.train_labels)), cfg.seed + 1, 1)))
    with run.autocast():
        torch.nn.functional.cross_entropy(model(run.inputs(x)), y).backward()
    grad = torch.cat([p.grad.reshape(-1) for p in flat.params])
    shard = shard_slices(flat.numel, len(shards))[0]
    rows = store.load_array(shard_path(0, len(shards)))
    chunks = [slice(i, i + (1 << 20)) for i in range(0, len(rows), 1 << 20)]
    g64 = grad[shard].double()
    exact = sum(torch.from_numpy(rows[c]).double().T @ g64[c] for c in chunks)
    coords = exact / exact.norm()
    out: dict[str, Any] = {"rows": len(rows), "dim": rows.shape[1]}
    for dtype, basis in (("fp32", torch.from_numpy(rows)), ("bf16", torch.from_numpy(rows).bfloat16())):
        space = Subspace(basis, shard)
        seconds: dict[str, list[float]] = {"project": [], "lift": []}
        for _ in range(repeats):
            start = time.perf_counter()
            projected = space.project(grad)
            seconds["project"].append(time.perf_counter() - start)
            start = time.perf_counter()
            lifted = space.lift(coords)
            seconds["lift"].append(time.perf_counter() - start)
        lift_error = (
            sum(float((lifted[c].double() - torch.from_numpy(rows[c]).double() @ coords).norm()) ** 2 for c in chunks)
            ** 0.5
        )  # against |P_0 c| = |c| = 1
        out[dtype] = {
            "project_rel_error": float((projected - exact).norm() / exact.norm()),
            "lift_rel_error": lift_error,
            "project_seconds": statistics.median(seconds["project"]),
            "lift_seconds": statistics.median(seconds["lift"]),
            "basis_bytes": basis.element_size() * basis.numel(),
        }
    return out


def _naive(num_params: int, num_snapshots: int, dim: int) -> dict[str, int]:
    """The naive approach's peak for phase 2 (stack + dense SVD) and phase 3 (all of P in one process)."""
    return {"basis": NAIVE_SVD_FACTOR * num_snapshots * num_params * 4, "train": num_params * dim * 4}


def _real(config: dict[str, Any], work: Path) -> dict[str, Any]:
    """Test accuracy and phase 3 seconds of float32 and bfloat16 P on the same phases 1 and 2."""
    run_dir = str(work / f"real-{config['data']}")
    cfg = {**config, "workers": 0, "run_dir": run_dir}
    out = {}
    for dtype in DTYPES:
        names = PHASES if dtype == "fp32" else ("train",)
        summary = _phases(cfg, names, {"basis_dtype": dtype})["summary"]
        out[dtype] = {
            "test_accuracy": summary["train"]["test_accuracy"],
            "seconds": summary["train"]["seconds"],
            "basis_bytes": summary["train"]["memory"][0]["basis_bytes"],
        }
    out["difference_points"] = 100 * (out["bf16"]["test_accuracy"] - out["fp32"]["test_accuracy"])
    shutil.rmtree(run_dir)
    return out


def run(preset_name: str, work: Path) -> tuple[dict, dict, str, Figure]:
    from dldr import ray_train

    preset = PRESETS[preset_name]
    runs: dict[str, Any] = {}
    results: dict[str, Any] = {"runs": runs}
    with ray_train.cluster(""):
        for shards in preset.shards:
            config = {
                **preset.config,
                "workers": 0 if shards == 1 else shards,
                "run_dir": str(work / f"shards-{shards}"),
            }
            for dtype in DTYPES:  # phase 3 again on the same basis, with P in bfloat16
                names = PHASES if dtype == "fp32" else ("train",)
                measured = _measured_phases({**config, "basis_dtype": dtype}, names, {"basis_dtype": dtype})
                runs[f"{shards}/{dtype}"] = {
                    "shards": shards,
                    "basis_dtype": dtype,
                    "phases": _figures(measured, names),
                }
                _print(runs[f"{shards}/{dtype}"])
                if dtype == "fp32":
                    summary = measured["summary"]
                    results["sizes"] = {
                        "num_params": sum(m["basis_rows"] for m in summary["train"]["memory"]),
                        "num_snapshots": summary["sample"]["snapshots"],
                        "dim": summary["basis"]["dim"],
                    }
                    if shards == max(preset.shards):
                        results["projection"] = report.in_fresh_process(
                            projection_error, config["run_dir"], preset.timing_repeats
                        )
            shutil.rmtree(config["run_dir"])  # ViT-B's snapshots and basis take 28 GB of disk
    results["naive_bytes"] = _naive(**results["sizes"])
    results["real"] = {f"{c['model']} on {c['data']}": _real(c, work) for c in preset.real}
    return asdict(preset), results, _markdown(preset_name, results), _figure(results)


def _print(entry: dict[str, Any]) -> None:
    parts = [
        f"{name} {p['seconds']:.1f} s, peak RSS {_gb(max(m['peak_rss_bytes'] for m in p['memory']))} GB"
        for name, p in entry["phases"].items()
    ]
    print(f"{entry['shards']} shard(s), P in {entry['basis_dtype']}: " + "; ".join(parts), flush=True)


def _gb(n: float | None) -> str:
    return "-" if n is None else f"{n / GB:.2f}"


def _markdown(preset_name: str, results: dict[str, Any]) -> str:
    s = results["sizes"]
    model = PRESETS[preset_name].config["model"]
    text = (
        f"{model}: D = {s['num_params']:,} parameters, t = {s['num_snapshots']} snapshots, d = {s['dim']}; "
        f"P is {_gb(s['num_params'] * s['dim'] * 4)} GB in float32.\n\n"
    )
    rows = []
    for entry in results["runs"].values():
        for name, p in entry["phases"].items():
            m = p["memory"]
            rows.append(
                [
                    entry["shards"],
                    entry["basis_dtype"],
                    name,
                    f"{p['seconds']:.1f}",
                    " / ".join(_gb(x["peak_rss_bytes"]) for x in m),
                    " / ".join(_gb(x.get("snapshot_bytes")) for x in m),
                    " / ".join(_gb(x["basis_bytes"]) for x in m) if name == "train" else "-",
                ]
            )
    text += report.table(
        ["shards", "P", "phase", "seconds", "peak RSS per process, GB", "snapshots held, GB", "P_r held, GB"], rows
    )
    naive = results["naive_bytes"]
    text += (
        f"\nThe naive approach for the same sizes (computed): phase 2 {_gb(naive['basis'])} GB (the stacked "
        f"trajectory and its dense SVD), phase 3 {_gb(naive['train'])} GB (all of P in one process).\n\n"
    )
    q = results["projection"]
    text += f"bf16 P against float32 P, on rank 0's {q['rows']:,} rows and a gradient at w_start:\n\n" + report.table(
        ["P", "bytes, GB", "P^T g: relative error vs float64", "P c: relative error", "P^T g, s", "P c, s"],
        [
            [
                d,
                _gb(q[d]["basis_bytes"]),
                f"{q[d]['project_rel_error']:.1e}",
                f"{q[d]['lift_rel_error']:.1e}",
                f"{q[d]['project_seconds']:.3f}",
                f"{q[d]['lift_seconds']:.3f}",
            ]
            for d in DTYPES
        ],
    )
    text += "\nTest accuracy with float32 and bfloat16 P (the same phases 1 and 2):\n\n"
    text += report.table(
        ["run", "fp32 P", "bf16 P", "difference (points)", "phase 3 s (fp32 / bf16)"],
        [
            [
                label,
                f"{r['fp32']['test_accuracy']:.4f}",
                f"{r['bf16']['test_accuracy']:.4f}",
                f"{r['difference_points']:+.2f}",
                f"{r['fp32']['seconds']:.1f} / {r['bf16']['seconds']:.1f}",
            ]
            for label, r in results["real"].items()
        ],
    )
    return text


def _figure(results: dict[str, Any]) -> Figure:
    fig = Figure(figsize=(7, 3.8))
    ax = fig.add_subplot(1, 1, 1)
    labels, peaks = [], []
    for key, entry in results["runs"].items():
        for name, p in entry["phases"].items():
            labels.append(f"{key}\n{name}")
            peaks.append(max(m["peak_rss_bytes"] for m in p["memory"]) / GB)
    ax.bar(range(len(peaks)), peaks, label="dldr: largest peak RSS of a process")
    ax.axhline(results["naive_bytes"]["basis"] / GB, color="C3", ls="--", label="naive phase 2")
    ax.axhline(results["naive_bytes"]["train"] / GB, color="C1", ls=":", label="naive phase 3")
    ax.set_xticks(range(len(peaks)), labels, fontsize=7)
    ax.set(ylabel="GB")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    return fig
