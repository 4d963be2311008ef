"""Test accuracy under 0, 20 and 40% label noise, full SGD against early-stopped SGD, DLDR, P-SGD and random."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from dldr.bench import report
from dldr.bench.methods import METHODS, PRESETS, describe, grid

NOISES = (0.0, 0.2, 0.4)


def run(preset: str, work: Path) -> tuple[dict, dict, str, Figure]:
    settings = PRESETS[preset]
    results = grid(settings, NOISES, work)
    text = ""
    for setting in settings:
        r = results[setting.label]
        rows = [[m, *(f"{r[str(n)][m]['test_accuracy']:.4f} ± {r[str(n)][m]['test_accuracy_std']:.4f}"
                      for n in NOISES)] for m in METHODS]
        for baseline in ("sgd", "sgd_early"):
            rows.append([f"dldr − {baseline} (points)",
                         *(f"{100 * (r[str(n)]['dldr']['test_accuracy'] - r[str(n)][baseline]['test_accuracy']):+.1f}"
                           for n in NOISES)])
        text += describe(setting, f"early stopping on a {setting.holdout:.0%} held-out split; ")
        text += report.table(["method", *(f"noise {n:.0%}" for n in NOISES)], rows) + "\n"
    return {s.label: vars(s) for s in settings}, results, text, _figure(results)


def _figure(results: dict[str, Any]) -> Figure:
    def draw(ax: Any, r: dict[str, Any]) -> None:
        for m in METHODS:
            ax.errorbar([100 * n for n in NOISES], [r[str(n)][m]["test_accuracy"] for n in NOISES],
                        yerr=[r[str(n)][m]["test_accuracy_std"] for n in NOISES], marker="o", capsize=3, label=m)
        ax.set(xlabel="label noise (%)", ylabel="test accuracy")

    return report.panels(results, draw, ylim=(0, 1))
