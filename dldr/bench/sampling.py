"""Which learning-rate schedule samples best: DLDR after phase 1 on a constant, step or cosine schedule.

The paper samples the constant-rate part of a step schedule; a short schedule of its own that
decays within the sampling budget (step or cosine) ends phase 1 nearer a minimum. Every run has
the same budget and peak rate, and phases 2 and 3 keep the README's defaults; the table gives
the accuracy where phase 1 ends and where DLDR ends (``dldr.bench.methods``).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from dldr.bench import methods, report
from dldr.bench.methods import Runner, Setting, tune
from dldr.schedule import KINDS

# each setting's wall-clock preset: its headline budget, sampled at the learning rate cosine SGD's grid
# picks (on digits the grid runs again)
PRESETS: dict[str, list[Setting]] = {
    "cpu": methods.PRESETS["cpu"],
    "fashion": methods.FASHION_AT_SGDS_LR,
    "smoke": [
        Setting(
            "digits, MLP",
            "mlp",
            "digits",
            3,
            (0.1,),
            dldr={"snapshot_every": 1, "dim": 4, "subspace_epochs": 1},
            seeds=(0,),
        )
    ],
}


def run(preset: str, work: Path) -> tuple[dict, dict, str, Figure]:
    settings = PRESETS[preset]
    results: dict[str, Any] = {}
    text = ""
    for setting in settings:
        lr, _, _ = tune(setting, work / setting.model)
        per_kind: dict[str, Any] = {}
        for kind in KINDS:
            variant = replace(setting, dldr={**setting.dldr, "lr_schedule": kind})
            sampled, trained = [], []
            for seed in setting.seeds:
                runner = Runner(variant, seed, 0.0, lr, work / f"{setting.model}-{kind}-{seed}")
                outcome = runner.dldr(setting.headline, psgd=False, random=False)[f"dldr {setting.headline}"]
                epochs = setting.sample_epochs(setting.headline)
                sampled.append(outcome.curve[epochs - 1][2])
                trained.append(outcome.test_accuracy)
                print(
                    f"{setting.label}, {kind} sampling, seed {seed}: phase 1 {sampled[-1]:.4f}, "
                    f"DLDR {trained[-1]:.4f} ({outcome.seconds:.1f} s)",
                    flush=True,
                )
            per_kind[kind] = {
                "sampled": sampled,
                "dldr": trained,
                "sampled_mean": float(np.mean(sampled)),
                "dldr_mean": float(np.mean(trained)),
                "dldr_std": float(np.std(trained)),
            }
        results[setting.label] = {"lr": lr, "schedules": per_kind}
        rows = [
            [
                kind,
                f"{r['sampled_mean']:.4f}",
                f"{r['dldr_mean']:.4f} ± {r['dldr_std']:.4f}",
                f"{100 * (r['dldr_mean'] - r['sampled_mean']):+.1f}",
            ]
            for kind, r in per_kind.items()
        ]
        text += (
            f"**{setting.label}** ({setting.model} on {setting.data}; seeds "
            f"{', '.join(map(str, setting.seeds))}; phase 1 {setting.sample_epochs(setting.headline)} epochs "
            f"at peak lr {lr:g}, cosine SGD's; DLDR {setting.dldr or 'the README defaults'})\n\n"
        )
        text += (
            report.table(
                [
                    "phase 1 schedule",
                    "phase 1 test accuracy",
                    "DLDR test accuracy (mean ± std)",
                    "DLDR − phase 1 (points)",
                ],
                rows,
            )
            + "\n"
        )
    return {s.label: vars(s) for s in settings}, results, text, _figure(results)


def _figure(results: dict[str, Any]) -> Figure:
    def draw(ax: Any, result: dict[str, Any]) -> None:
        r = result["schedules"]
        x = np.arange(len(r))
        ax.bar(x - 0.2, [v["sampled_mean"] for v in r.values()], 0.4, label="end of phase 1")
        ax.bar(
            x + 0.2, [v["dldr_mean"] for v in r.values()], 0.4, yerr=[v["dldr_std"] for v in r.values()], label="DLDR"
        )
        ax.set_xticks(x, list(r))
        low = min(min(v["sampled_mean"], v["dldr_mean"]) for v in r.values())
        ax.set(ylabel="test accuracy", ylim=(max(0.0, low - 0.05), 1.0))

    return report.panels(results, draw)
