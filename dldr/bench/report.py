"""What every benchmark writes: NAME-PRESET.json (figures, settings, machine), .png and .md."""

from __future__ import annotations

import json
import multiprocessing
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from dldr import memory
from dldr.plots import png

PACKAGES = ("torch", "torchvision", "timm", "ray", "numpy", "scipy")
# benchmarks/README.md shows each benchmark's latest tables between these marks, copied from results/
RESULTS_BLOCK = re.compile(r"(<!-- results/(?P<name>[\w.-]+\.md) -->\n)(.*?)(<!-- end of results -->)", re.S)
CPU_EXTENSIONS = ("avx2", "avx512f", "sha_ni")


def machine() -> dict[str, Any]:
    """The CPU, cores, memory, GPU and package versions a figure was taken with."""
    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "gpu": None,
    }
    if "torch" in sys.modules:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name()
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    info["versions"] = versions
    info["commit"] = _commit()
    return info


def _cpu_model() -> str:
    """The CPU's name with its family, model and the vector extensions the timings depend on: a
    virtual machine's "AMD EPYC" alone does not tell a 2017 core from a 2023 one."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor's fields
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    if "model name" not in fields:
        return platform.processor() or platform.machine()
    extensions = [x for x in CPU_EXTENSIONS if x in fields.get("flags", "").split()]
    return (
        f"{fields['model name']}, family {fields.get('cpu family', '?')} model {fields.get('model', '?')} "
        f"[{' '.join(extensions) or 'no avx2'}]"
    )


def _commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).parent,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def panels(
    results: dict[str, Any], draw: Callable[[Any, Any], None], ylim: tuple[float, float] | None = None
) -> Figure:
    """One panel per setting of ``results`` ({label: result}), each drawn by ``draw(axes, result)``."""
    fig = Figure(figsize=(5 * len(results), 3.8))
    for i, (label, result) in enumerate(results.items(), start=1):
        ax = fig.add_subplot(1, len(results), i)
        draw(ax, result)
        ax.set(title=label, ylim=ylim)
        ax.grid(alpha=0.3)
        ax.legend()
    return fig


def write(
    out: Path,
    name: str,
    preset: str,
    settings: dict[str, Any],
    results: Any,
    markdown: str,
    figure: Figure,
    seconds: float,
) -> Path:
    """NAME-PRESET.json, .png and .md under ``out``; the markdown is what benchmarks/README.md shows."""
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{name}-{preset}"
    info = machine()
    gpu = f", {info['gpu']}" if info["gpu"] else ", no GPU"
    header = (
        f"`dldr bench {name} --preset {preset}`, {time.strftime('%Y-%m-%d')}, {info['cpu']} "
        f"({info['cores']} cores, {info['memory_gb']} GB{gpu}), torch {info['versions']['torch']}, "
        f"{seconds:.0f} s in all\n\n"
    )
    report = {
        "benchmark": name,
        "preset": preset,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": f"dldr bench {name} --preset {preset}",
        "seconds": seconds,
        "machine": info,
        "settings": settings,
        "results": results,
    }
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    stem.with_suffix(".png").write_bytes(png(figure))
    stem.with_suffix(".md").write_text(header + markdown)
    return stem


def timed_phases(run: Any, names: Sequence[str]) -> dict[str, float]:
    """Run the phases ``names`` of ``run`` (a ``phases.Run``) one after another, in this process or on the
    connected Ray cluster when it has --workers; each phase's wall time, worker start-up included."""
    from dldr import phases

    walls = {}
    for name in names:
        start = time.perf_counter()
        if run.cfg.workers:
            from dldr import ray_train

            ray_train.run_phases(run, [name])
        else:
            phases.PHASE_FUNCTIONS[name](run)
        walls[name] = time.perf_counter() - start
    return walls


def _measured(fn: Callable[..., dict[str, Any]], args: tuple) -> dict[str, Any]:
    before = memory.status_bytes("VmRSS")
    start = time.perf_counter()
    result = fn(*args)
    seconds = time.perf_counter() - start
    peak = memory.status_bytes("VmHWM")  # not ru_maxrss: that one keeps the forking parent's peak across exec
    return {**result, "seconds": seconds, "peak_rss_bytes": peak, "rss_before_bytes": before}


def in_fresh_process(fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """``fn(*args)`` in a new process, with its wall time and the process's peak resident memory.

    A fresh process, so the peak is this call's alone; ``rss_before_bytes`` is what the process
    held (the interpreter and imports) before the call began.
    """
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_measured, (fn, args))


def embed_results(text: str, folder: Path) -> str:
    """``text`` (benchmarks/README.md) with each marked block replaced by the results file it names.

    ``python -m dldr.bench.report`` rewrites benchmarks/README.md so after a benchmark ran.
    """
    return RESULTS_BLOCK.sub(lambda m: m.group(1) + (folder / m["name"]).read_text() + m.group(4), text)


if __name__ == "__main__":
    readme = Path(__file__).resolve().parents[2] / "benchmarks" / "README.md"
    readme.write_text(embed_results(readme.read_text(), readme.parent / "results"))
