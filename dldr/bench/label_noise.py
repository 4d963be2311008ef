"""Test accuracy under label noise: full-budget and early-stopped SGD against DLDR and P-SGD
(``dldr.bench.methods``)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from dldr.bench import methods, report
from dldr.bench.methods import compare, describe

# the label noise of each preset; the fashion preset leaves the clean case to wallclock
NOISES = {"cpu": (0.0, 0.2, 0.4), "fashion": (0.2, 0.4), "gpu": (0.0, 0.2, 0.4), "smoke": (0.0, 0.2, 0.4)}
# on digits DLDR samples 10 of SGD's 60 epochs, `dldr fit`'s default: after 20 (the wall-clock
# headline, 1/3) both networks have already fitted much of the noise (0.83 at 40%, 2026-12-04)
PRESETS = {
    **methods.PRESETS,
    "cpu": [replace(s, headline="1/6") for s in methods.PRESETS["cpu"]],
    "fashion": methods.FASHION_AT_SGDS_LR,
}


def run(preset: str, work: Path) -> tuple[dict, dict, str, Figure]:
    settings, noises = PRESETS[preset], NOISES[preset]
    results = compare(settings, noises, work, extras=False)
    text = ""
    for setting in settings:
        r = results[setting.label]
        dldr = f"dldr {setting.headline}"
        methods = list(r[str(noises[0])])
        rows = [
            [m, *(f"{r[str(n)][m]['test_accuracy']:.4f} ± {r[str(n)][m]['test_accuracy_std']:.4f}" for n in noises)]
            for m in methods
        ]
        for baseline in ("sgd", "sgd_early"):
            cells = []
            for n in noises:
                diff = 100 * (np.array(r[str(n)][dldr]["test_accuracies"]) - r[str(n)][baseline]["test_accuracies"])
                r[str(n)][f"{dldr} - {baseline}"] = {
                    "points": diff.tolist(),
                    "mean": float(diff.mean()),
                    "std": float(diff.std()),
                }
                cells.append(f"{diff.mean():+.1f} ± {diff.std():.1f}")
            rows.append([f"{dldr} − {baseline} (points, per seed)", *cells])
        text += describe(setting, r["lr"], r["grid"], f"early stopping on a {setting.holdout:.0%} held-out split; ")
        text += report.table(["method", *(f"noise {n:.0%}" for n in noises)], rows) + "\n"
    return {s.label: vars(s) for s in settings}, results, text, _figure(results, noises)


def _figure(results: dict[str, Any], noises: tuple[float, ...]) -> Figure:
    def draw(ax: Any, r: dict[str, Any]) -> None:
        for m, first in r[str(noises[0])].items():
            if "test_accuracy" not in first:
                continue
            ax.errorbar(
                [100 * n for n in noises],
                [r[str(n)][m]["test_accuracy"] for n in noises],
                yerr=[r[str(n)][m]["test_accuracy_std"] for n in noises],
                marker="o",
                capsize=3,
                label=m,
            )
        ax.set(xlabel="label noise (%)", ylabel="test accuracy")

    return report.panels(results, draw, ylim=(0, 1))
