"""``dldr bench NAME``: the benchmarks that check the paper's claims on this machine.

Each module has ``PRESETS`` and ``run(preset, work) -> (settings, results, markdown, figure)``;
``run`` here times it and writes benchmarks/results/NAME-PRESET.json, .png and .md.
"""

from __future__ import annotations

import importlib
import tempfile
import time
from pathlib import Path

from dldr.errors import DldrError

BENCHMARKS = {
    "wallclock": "cosine, step and early-stopped SGD vs DLDR at several sampling budgets, P-SGD and a random "
    "subspace: accuracy, epochs, seconds",
    "label_noise": "full-budget and early-stopped SGD against DLDR and P-SGD under label noise",
    "sampling": "DLDR after phase 1 on a constant, step or cosine learning-rate schedule",
    "step": "time per optimizer step of SGD, P-SGD and P-BFGS, piece by piece",
    "basis": "phase 2 time and peak memory at D = 25.6M, t = 60 against the naive dense SVD",
    "distributed": "1 vs 2 Ray Train workers: wall time per phase and basis agreement",
    "large": "ViT-B/16 through every phase with 1 and 2 shards and P in float32 and bfloat16: time and peak memory "
    "per phase and process against the naive approach; bf16 P's error and accuracy",
    "gpu": "the device check: the CUDA tests, step on GPU-sized models, ViT-B/16 through every phase with P on the "
    "GPU, Fashion-MNIST SGD against DLDR; one in-process run of about 5 minutes",
}
DEFAULT_OUT = "benchmarks/results"


def run(name: str, preset: str, out: str = DEFAULT_OUT, work_dir: str | None = None) -> Path:
    """Run benchmark ``name`` with ``preset``; returns the stem of the files written."""
    if name not in BENCHMARKS:
        raise DldrError(f"unknown benchmark {name!r}; use one of {', '.join(BENCHMARKS)}")
    module = importlib.import_module(f"dldr.bench.{name}")
    if preset not in module.PRESETS:
        raise DldrError(f"{name} has no preset {preset!r}; use one of {', '.join(module.PRESETS)}")
    if preset == "gpu":
        import torch

        if not torch.cuda.is_available():
            raise DldrError("--preset gpu needs a CUDA GPU and torch sees none; use --preset cpu")
    from dldr.bench import report

    if work_dir is not None:
        Path(work_dir).mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"dldr-bench-{name}-", dir=work_dir) as work:
        settings, results, markdown, figure = module.run(preset, Path(work))
    stem = report.write(Path(out), name, preset, settings, results, markdown, figure, time.perf_counter() - start)
    print(f"\n{markdown}\nwrote {stem}.json, .png and .md")
    return stem
