"""Full-budget SGD against DLDR, P-SGD and a random subspace: accuracy, epochs, seconds (``dldr.bench.methods``)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from dldr.bench import report
from dldr.bench.methods import METHODS, PRESETS, describe, grid


def run(preset: str, work: Path) -> tuple[dict, dict, str, Figure]:
    settings = PRESETS[preset]
    results = {label: by_noise["0.0"] for label, by_noise in grid(settings, (0.0,), work).items()}
    text = ""
    for setting in settings:
        r = results[setting.label]
        rows = []
        for m in METHODS:
            s = r[m]
            seeds = len(setting.seeds)
            reach = (f"{s['epochs_to_sgd']:.1f} ep, {s['seconds_to_sgd']:.1f} s ({s['reached_sgd']}/{seeds})"
                     if s["reached_sgd"] else f"never (0/{seeds})")
            rows.append([m, f"{s['test_accuracy']:.4f} ± {s['test_accuracy_std']:.4f}", f"{s['epochs']:g}",
                         f"{s['seconds']:.1f}", reach])
        text += describe(setting)
        text += report.table(["method", "test accuracy (mean ± std)", "epochs", "seconds",
                              "to reach full SGD's final accuracy"], rows) + "\n"
    return {s.label: vars(s) for s in settings}, results, text, _figure(results)


def _figure(results: dict[str, Any]) -> Figure:
    def draw(ax: Any, r: dict[str, Any]) -> None:
        for m in METHODS:
            curve = r[m]["curve_seed0"]
            ax.plot([c[1] for c in curve], [c[2] for c in curve], marker=".", label=m)
        ax.set(xlabel="wall seconds (seed 0)", ylabel="test accuracy")

    return report.panels(results, draw, ylim=(0, 1))
