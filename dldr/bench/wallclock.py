"""Full-budget SGD (cosine, step, early-stopped) against DLDR at several sampling budgets, P-SGD and a
random subspace: accuracy, epochs and seconds, and accuracy against seconds (``dldr.bench.methods``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from dldr.bench import report
from dldr.bench.methods import PRESETS, WITHIN, compare, describe, smallest_budget_within


def run(preset: str, work: Path) -> tuple[dict, dict, str, Figure]:
    settings = PRESETS[preset]
    compared = compare(settings, (0.0,), work, extras=True)
    results: dict[str, Any] = {}
    text = ""
    for setting in settings:
        c = compared[setting.label]
        summary = c["0.0"]
        within = smallest_budget_within(summary, setting.budgets)
        results[setting.label] = {
            "lr": c["lr"],
            "grid": c["grid"],
            "methods": summary,
            "smallest_budget_within": within,
        }
        sgd = summary["sgd"]
        seeds = len(setting.seeds)
        rows = []
        for method, s in summary.items():
            reach = (
                f"{s['epochs_to_sgd']:.1f} ep, {s['seconds_to_sgd']:.1f} s ({s['reached_sgd']}/{seeds})"
                if s["reached_sgd"]
                else f"never (0/{seeds})"
            )
            rows.append(
                [
                    method,
                    f"{s['test_accuracy']:.4f} ± {s['test_accuracy_std']:.4f}",
                    f"{100 * (s['test_accuracy'] - sgd['test_accuracy']):+.1f}",
                    f"{s['epochs']:g}",
                    f"{s['seconds']:.1f}",
                    f"{s['epochs'] / sgd['epochs']:.2f}",
                    f"{s['seconds'] / sgd['seconds']:.2f}",
                    reach,
                ]
            )
        text += describe(setting, c["lr"], c["grid"])
        text += (
            report.table(
                [
                    "method",
                    "test accuracy (mean ± std)",
                    "vs sgd (points)",
                    "epochs",
                    "seconds",
                    "epochs / sgd's",
                    "seconds / sgd's",
                    "to reach sgd's final accuracy",
                ],
                rows,
            )
            + "\n"
        )
        if within is None:
            text += f"No DLDR budget came within {100 * WITHIN:.1f} points of sgd.\n\n"
        else:
            s = summary[f"dldr {within}"]
            text += (
                f"The smallest DLDR budget within {100 * WITHIN:.1f} points of sgd: {within} of its epochs "
                f"({s['epochs'] / sgd['epochs']:.2f} of its epochs and {s['seconds'] / sgd['seconds']:.2f} of its "
                "seconds, phases 2 and 3 included).\n\n"
            )
    return {s.label: vars(s) for s in settings}, results, text, _figure(results)


def _figure(results: dict[str, Any]) -> Figure:
    def draw(ax: Any, r: dict[str, Any]) -> None:
        for method, s in r["methods"].items():
            curve = s["curve_seed0"]
            style = "--" if method.startswith("sgd") else "-"
            ax.plot([c[1] for c in curve], [c[2] for c in curve], style, marker=".", markersize=3, label=method)
        finals = [s["test_accuracy"] for m, s in r["methods"].items() if m != "random"]
        ax.set(
            xlabel="wall seconds (seed 0, phase 2 included)",
            ylabel="test accuracy",
            ylim=(max(0.0, min(finals) - 0.08), min(1.0, max(finals) + 0.02)),
        )

    return report.panels(results, draw)
