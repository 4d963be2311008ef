"""Phase 2 at scale: the streamed basis against the naive approach on the same snapshot files.

The snapshots are a seeded random walk w_k = w_{k-1} + s_k in D parameters, written as phase 1
writes them (sharded .npy files with checksums in the manifest). For 1 and 2 shards, each of
these runs in a fresh process, after the page cache was dropped when the machine allows it:

read      every snapshot file read once, front to back, 64 MB at a time, through the page cache
direct    the same past the page cache (O_DIRECT), as phase 2 reads: the faster of the two reads
          is the floor of any phase 2
streamed  ``dldr.basis.build_basis``, as `dldr basis` runs it (one read: row blocks, Gram, eigh)
rows      ``dldr.basis.basis_shard`` for rank 0: P_0 formed from its snapshot rows and written to
          basis/, as phase 3 starts
naive     all snapshots stacked in RAM (t x D), centred, one dense SVD, P written as one file

read, direct and streamed run ``repeats`` times, alternating, and report the median: a cold read
on a shared virtual disk varies by 20-30% from one run to the next. Peak memory is the peak resident
set of each process; the two bases are compared by their largest principal angle.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.linalg
from matplotlib.figure import Figure

from dldr.basis import basis_rows, basis_shard, build_basis
from dldr.bench import report
from dldr.store import MANIFEST, RunStore, direct_io, paged_rows, snapshot_path


@dataclass
class Preset:
    num_params: int
    num_snapshots: int
    dim: int
    shards: tuple[int, ...] = (1, 2)
    repeats: int = 3
    seed: int = 0


PRESETS = {
    "cpu": Preset(num_params=25_600_000, num_snapshots=60, dim=40),  # ResNet-50: 25.6M, ~6 GB
    "smoke": Preset(num_params=20_000, num_snapshots=12, dim=4, repeats=1),
}


STEPS = {
    "read": "one read: through the page cache",
    "direct": "direct read: one read past the page cache",
    "streamed": "phase 2: streamed",
    "rows": "phase 3 start: P_0 of rank 0",
    "naive": "naive: stack + SVD",
}


def write_walk(url: str, preset: Preset, num_shards: int) -> None:
    """The seeded random walk, written as ``num_shards`` shards of snapshot files."""
    from dldr.params import shard_slices  # torch: kept out of the measured processes, which import this module

    store = RunStore(url)
    rng = np.random.default_rng(preset.seed)
    w = rng.standard_normal(preset.num_params, dtype=np.float32) * 0.05
    slices = shard_slices(preset.num_params, num_shards)
    for step in range(preset.num_snapshots):
        if step:
            w += rng.standard_normal(preset.num_params, dtype=np.float32) * np.float32(1e-3 / np.sqrt(step))
        for rank, rows in enumerate(slices):
            store.save_array(snapshot_path(rank, num_shards, step), w[rows])


def drop_page_cache() -> bool:
    """Write back and drop the page cache (root on Linux), so the next read comes from the disk."""
    try:
        import os

        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        return False
    return True


def read_once(url: str, direct: bool = False) -> dict[str, Any]:
    store, total = RunStore(url), 0
    pages, _ = paged_rows(1, 64 << 20, 0)
    buffer = memoryview(pages[0])
    for rel in store.files("snapshots/"):
        fd = os.open(store.abspath(rel), os.O_RDONLY | (os.O_DIRECT if direct else 0))
        try:
            offset = 0
            while (n := os.preadv(fd, [buffer], offset)) == len(buffer):  # direct reads stop at the short one
                offset += n
            total += offset + n
        finally:
            os.close(fd)
    return {"bytes": total}


def streamed(url: str, dim: int) -> dict[str, Any]:
    return {"report": build_basis(RunStore(url), dim).to_dict()}


def rank_rows(url: str, num_shards: int) -> dict[str, Any]:
    from dldr.params import shard_slices

    store = RunStore(url)
    rows = shard_slices(store.read_json("basis/report.json")["num_params"], num_shards)[0]
    return {"rows": rows.stop - rows.start, "bytes": int(basis_shard(store, rows, 0, num_shards)[0].nbytes)}


def naive(url: str, dim: int, out: str) -> dict[str, Any]:
    """Stack every snapshot in RAM, centre, one dense SVD; write P (D x d) as one file."""
    store = RunStore(url)
    shards = store.snapshot_shards()
    steps = list(zip(*shards, strict=True))
    stacked = np.stack([np.concatenate([store.load_array(rel) for rel in files]) for files in steps])
    stacked -= stacked.mean(axis=0)
    # the transpose is Fortran-ordered, so the SVD works in place instead of on a copy
    u, s, _ = scipy.linalg.svd(stacked.T, full_matrices=False, overwrite_a=True, check_finite=False)
    np.save(out, u[:, :dim])
    return {"eigvals": (s.astype(np.float64) ** 2).tolist()}


def largest_angle(url: str, naive_file: str, block: int = 1 << 20) -> float:
    """The largest principal angle between the streamed basis and the naive one, read block by block."""
    theirs = np.load(naive_file, mmap_mode="r", allow_pickle=False)
    ours = basis_rows(RunStore(url), slice(0, len(theirs)))[0]
    cross = 0.0
    for start in range(0, len(ours), block):
        a = np.asarray(ours[start : start + block], dtype=np.float64)
        cross = cross + a.T @ np.asarray(theirs[start : start + len(a)], dtype=np.float64)
    cosines = np.linalg.svd(cross, compute_uv=False)
    return float(np.arccos(np.clip(cosines.min(), -1.0, 1.0)))


def run(preset_name: str, work: Path) -> tuple[dict, dict, str, Figure]:
    preset = PRESETS[preset_name]
    results: dict[str, Any] = {}
    for num_shards in preset.shards:
        url = str(work / f"walk-{num_shards}")
        start = time.perf_counter()
        write_walk(url, preset, num_shards)
        print(
            f"{num_shards} shard(s): wrote {preset.num_snapshots} snapshots of {preset.num_params:,} "
            f"parameters in {time.perf_counter() - start:.0f} s",
            flush=True,
        )
        row: dict[str, Any] = {}
        runs: dict[str, list[dict[str, Any]]] = {}
        reads = [("read", read_once, (url,))]
        if direct_io(RunStore(url).abspath(MANIFEST)):
            reads.append(("direct", read_once, (url, True)))
        steps = [*reads, ("streamed", streamed, (url, preset.dim))] * preset.repeats
        steps += [
            ("rows", rank_rows, (url, num_shards)),
            ("naive", naive, (url, preset.dim, str(work / "naive-basis.npy"))),
        ]
        for name, fn, args in steps:
            cold = drop_page_cache()
            measured = {**report.in_fresh_process(fn, *args), "cold_cache": cold}
            runs.setdefault(name, []).append(measured)
            print(
                f"  {name:9s} {measured['seconds']:7.1f} s, peak RSS {measured['peak_rss_bytes'] / 2**30:6.2f} GiB"
                f"{'' if cold else ' (page cache not dropped)'}",
                flush=True,
            )
        for name, measured in runs.items():  # the run of median time
            row[name] = sorted(measured, key=lambda m: m["seconds"])[len(measured) // 2]
            row[f"{name}_seconds_each"] = [m["seconds"] for m in measured]
        row["read_warm"] = report.in_fresh_process(read_once, url)
        row["largest_principal_angle"] = largest_angle(url, str(work / "naive-basis.npy"))
        eigvals = np.array(row["naive"].pop("eigvals"))
        stored = np.load(RunStore(url).abspath("basis/eigvals.npy"), allow_pickle=False)
        row["eigval_max_rel_diff"] = float(
            np.max(np.abs(stored[: preset.dim] - eigvals[: preset.dim]) / eigvals[: preset.dim])
        )
        row["snapshot_bytes"] = row["read"]["bytes"]
        row["floor"] = min((name for name, _, _ in reads), key=lambda name: row[name]["seconds"])
        row["time_vs_read"] = row["streamed"]["seconds"] / row[row["floor"]]["seconds"]
        row["memory_vs_naive"] = row["streamed"]["peak_rss_bytes"] / row["naive"]["peak_rss_bytes"]
        results[f"{num_shards}"] = row
        RunStore(url).remove("")
        (work / "naive-basis.npy").unlink()
    return asdict(preset), results, _markdown(preset, results), _figure(results)


def _markdown(preset: Preset, results: dict[str, Any]) -> str:
    gib = 2**30
    rows = []
    for shards, r in results.items():
        for name, label in ((n, label) for n, label in STEPS.items() if n in r):
            m = r[name]
            each = " ".join(f"{x:.1f}" for x in r[f"{name}_seconds_each"])
            rows.append(
                [
                    shards,
                    label,
                    f"{m['seconds']:.1f}",
                    each,
                    f"{m['peak_rss_bytes'] / gib:.2f}",
                    f"{(m['peak_rss_bytes'] - m['rss_before_bytes']) / gib:.2f}",
                ]
            )
    text = (
        f"D = {preset.num_params:,} parameters, t = {preset.num_snapshots} snapshots "
        f"({next(iter(results.values()))['snapshot_bytes'] / gib:.2f} GiB of float32 files), d = {preset.dim}; "
        f"each step in a fresh process after dropping the page cache; the reads and phase 2 {preset.repeats} "
        "times, alternating; phase 2 is compared with the faster read. Phase 2 reads the snapshots once "
        "and stores t x d coefficients; each phase 3 rank forms its rows of P from its snapshot rows as it "
        "starts and writes them to basis/ (the `rows` step, rank 0 of N).\n\n"
    )
    text += report.table(
        ["shards", "step", "seconds (median)", "each run", "peak RSS GiB", "above the process's start GiB"], rows
    )
    text += "\n" + report.table(
        [
            "shards",
            "streamed / faster read (time)",
            "streamed / naive (peak memory)",
            "one read, warm cache (s)",
            "largest principal angle",
            "max rel. eigenvalue diff",
        ],
        [
            [
                s,
                f"{r['time_vs_read']:.2f}",
                f"{r['memory_vs_naive']:.3f}",
                f"{r['read_warm']['seconds']:.1f}",
                f"{r['largest_principal_angle']:.1e}",
                f"{r['eigval_max_rel_diff']:.1e}",
            ]
            for s, r in results.items()
        ],
    )
    return text


def _figure(results: dict[str, Any]) -> Figure:
    fig = Figure(figsize=(9, 3.5))
    ax_t, ax_m = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    names = [n for n in STEPS if n in next(iter(results.values()))]
    x = np.arange(len(names))
    width = 0.8 / len(results)
    for i, (shards, r) in enumerate(results.items()):
        ax_t.bar(x + i * width, [r[n]["seconds"] for n in names], width, label=f"{shards} shard(s)")
        ax_m.bar(x + i * width, [r[n]["peak_rss_bytes"] / 2**30 for n in names], width, label=f"{shards} shard(s)")
    for ax, label in ((ax_t, "seconds"), (ax_m, "peak resident memory (GiB)")):
        ax.set_xticks(x + width * (len(results) - 1) / 2, [STEPS[n].split(":")[0] for n in names])
        ax.set_ylabel(label)
        ax.legend()
        ax.grid(alpha=0.3, axis="y")
    return fig
