"""The training methods the wall-clock and label-noise benchmarks compare, through dldr's own phases.

=============  =================================================================================
sgd            phase 1 alone for the full budget on a cosine schedule; its learning rate is the
               best final test accuracy of a small grid on the first seed (the grid is reported)
sgd_step       the same budget and learning rate on the paper's step schedule (x0.1 at 2/3)
sgd_short      cosine SGD for as many epochs as DLDR at the headline budget uses in all: the
               short schedule DLDR has to beat, not only the long one
sgd_early      cosine SGD on the training set minus a held-out split (as noisy as the rest),
               stopped at its best validation epoch: SGD's honest strong baseline under noise
dldr 1/3 ...   phase 1 for that fraction of SGD's epochs, the trajectory basis (phase 2), then
               P-BFGS (phase 3); every setting the README's defaults unless the preset says
psgd           the basis of the headline budget, P-SGD in phase 3
random         a random basis of the same d, P-BFGS from w_0 (Li et al. 2018); its epochs and
               seconds count phases 2 and 3 only, since it uses no trajectory
=============  =================================================================================

Every run is in-process (``--workers 0``), so the seconds are the method's, not Ray's; they
include each epoch's evaluation, as SGD's curve does.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from dldr import phases
from dldr.config import Config

# within this much of full-budget SGD's mean test accuracy, DLDR counts as level with it
WITHIN = 0.005


@dataclass
class Setting:
    """One model on one data set: full SGD's budget and learning-rate grid, and DLDR's sampling budgets."""

    label: str
    model: str
    data: str
    sgd_epochs: int
    lrs: tuple[float, ...]  # cosine SGD's grid on the first seed, clean labels; one value: no grid
    budgets: tuple[str, ...] = ("1/6", "1/3", "1/2", "2/3")  # DLDR's phase 1, in fractions of sgd_epochs
    headline: str = "1/3"  # the budget P-SGD, the random subspace and the label-noise runs use
    dldr: dict[str, Any] = field(default_factory=dict)  # Config keys of DLDR runs; {}: the README's defaults
    common: dict[str, Any] = field(default_factory=dict)  # Config keys of every run (device, batch size)
    seeds: tuple[int, ...] = (0, 1, 2)
    holdout: float = 0.2

    def sample_epochs(self, budget: str) -> int:
        return max(1, round(Fraction(budget) * self.sgd_epochs))


@dataclass
class Outcome:
    test_accuracy: float
    epochs: int
    seconds: float
    curve: list[tuple[int, float, float]]  # (epochs, seconds, test accuracy) after every epoch

    def reach(self, accuracy: float) -> tuple[int, float] | None:
        """(epochs, seconds) of the first epoch at or above ``accuracy``, if there is one."""
        return next(((e, s) for e, s, a in self.curve if a >= accuracy), None)


def _curve(run: phases.Run, phase: str, epochs: int = 0, seconds: float = 0.0) -> list[tuple[int, float, float]]:
    return [
        (epochs + r["epoch"], seconds + r["seconds"], r["test_accuracy"])
        for r in run.log.records
        if r["phase"] == phase
    ]


class Runner:
    """Runs the methods of one setting, seed and label noise, each in its own run directory under ``work``."""

    def __init__(self, setting: Setting, seed: int, noise: float, lr: float, work: Path):
        self.setting, self.lr, self.work = setting, lr, work
        self.base = {
            **setting.common,
            "model": setting.model,
            "data": setting.data,
            "seed": seed,
            "label_noise": noise,
            "workers": 0,
        }

    def start(self, name: str, **keys: Any) -> phases.Run:
        return phases.start_run(
            Config.from_dict({**self.base, **keys, "run_dir": str(self.work / name)}), progress=False
        )

    def sgd(self, name: str, schedule: str = "cosine", epochs: int = 0, **keys: Any) -> tuple[phases.Run, Outcome]:
        """Phase 1 alone for ``epochs`` (the full budget unless given), a snapshot per epoch."""
        epochs = epochs or self.setting.sgd_epochs
        run = self.start(name, lr=self.lr, lr_schedule=schedule, snapshot_every=0, sample_epochs=epochs, **keys)
        result = phases.sample(run)
        return run, Outcome(result["test_accuracy"], epochs, result["seconds"], _curve(run, "sample"))

    def early(self) -> Outcome:
        run, _ = self.sgd("sgd_early", holdout=self.setting.holdout)
        records = [r for r in run.log.records if r["phase"] == "sample"]
        best = max(records, key=lambda r: (r["val_accuracy"], -r["epoch"]))  # the earliest of the best
        return Outcome(best["test_accuracy"], best["epoch"], best["seconds"], _curve(run, "sample")[: best["epoch"]])

    def dldr(self, budget: str, psgd: bool, random: bool) -> dict[str, Outcome]:
        """DLDR after ``budget`` of SGD's epochs (sampled at SGD's learning rate, as the paper samples the
        start of SGD's own run), and P-SGD and the random subspace on its run directory."""
        name = f"dldr-{budget.replace('/', 'of')}"
        run = self.start(name, **{"lr": self.lr, **self.setting.dldr}, sample_epochs=self.setting.sample_epochs(budget))
        sampled, basis = phases.sample(run), phases.basis(run)
        before = sampled["seconds"] + basis["seconds"]
        out = {}
        for method, overrides in ((f"dldr {budget}", {}), ("psgd", {"optimizer": "psgd"}))[: 1 + psgd]:
            trained_run = phases.open_run(run.store.url, overrides, progress=False)
            trained = phases.train(trained_run)
            out[method] = Outcome(
                trained["test_accuracy"],
                sampled["epochs"] + trained["epochs"],
                before + trained["seconds"],
                _curve(run, "sample") + _curve(trained_run, "train", sampled["epochs"], before),
            )
        if random:
            random_run = phases.open_run(run.store.url, {"subspace": "random", "start": "first"}, progress=False)
            basis, trained = phases.basis(random_run), phases.train(random_run)
            out["random"] = Outcome(
                trained["test_accuracy"],
                trained["epochs"],
                basis["seconds"] + trained["seconds"],
                _curve(random_run, "train", 0, basis["seconds"]),
            )
        return out


def tune(setting: Setting, work: Path) -> tuple[float, dict[str, float], Outcome | None]:
    """Cosine SGD's learning rate: the grid's best final test accuracy on the first seed with clean labels.

    Picking on the test set flatters the baseline, never DLDR. Returns the learning rate, the
    grid's accuracies and the chosen run's outcome (the first seed's ``sgd`` at noise 0); a grid
    of one learning rate runs nothing.
    """
    if len(setting.lrs) == 1:
        return setting.lrs[0], {}, None
    tried = {
        lr: Runner(setting, setting.seeds[0], 0.0, lr, work / "grid").sgd(f"sgd-lr{lr:g}")[1] for lr in setting.lrs
    }
    best = max(tried, key=lambda lr: (tried[lr].test_accuracy, -lr))
    return best, {f"{lr:g}": o.test_accuracy for lr, o in tried.items()}, tried[best]


def run_methods(
    setting: Setting,
    seed: int,
    noise: float,
    lr: float,
    work: Path,
    budgets: tuple[str, ...],
    extras: bool,
    sgd: Outcome | None = None,
) -> dict[str, Outcome]:
    """Every method once on ``setting`` with this seed and label noise (``sgd``: its run, already done)."""
    runner = Runner(setting, seed, noise, lr, work)
    out = {"sgd": sgd or runner.sgd("sgd")[1]}
    if extras:
        out["sgd_step"] = runner.sgd("sgd_step", "step")[1]
    out["sgd_early"] = runner.early()
    for budget in budgets:
        headline = budget == setting.headline
        out.update(runner.dldr(budget, psgd=headline, random=headline and extras))
    if extras:
        out["sgd_short"] = runner.sgd("sgd_short", epochs=out[f"dldr {setting.headline}"].epochs)[1]
    order = [m for prefix in ("sgd", "dldr") for m in out if m.startswith(prefix)]
    return {m: out[m] for m in order + [m for m in out if m not in order]}


def summarize(per_seed: list[dict[str, Outcome]]) -> dict[str, dict[str, Any]]:
    """Per method over the seeds: test accuracy (mean, std, each), epochs, seconds, and the
    epochs and seconds to reach full SGD's final accuracy of the same seed (mean over the seeds that did)."""
    summary = {}
    for method in per_seed[0]:
        outcomes = [s[method] for s in per_seed]
        reached = [o.reach(s["sgd"].test_accuracy) for o, s in zip(outcomes, per_seed, strict=True)]
        hits = [r for r in reached if r is not None]
        acc = np.array([o.test_accuracy for o in outcomes])
        summary[method] = {
            "test_accuracy": float(acc.mean()),
            "test_accuracy_std": float(acc.std()),
            "test_accuracies": acc.tolist(),
            "epochs": float(np.mean([o.epochs for o in outcomes])),
            "seconds": float(np.mean([o.seconds for o in outcomes])),
            "reached_sgd": len(hits),
            "epochs_to_sgd": float(np.mean([h[0] for h in hits])) if hits else None,
            "seconds_to_sgd": float(np.mean([h[1] for h in hits])) if hits else None,
            "curve_seed0": outcomes[0].curve,
        }
    return summary


def smallest_budget_within(summary: dict[str, dict[str, Any]], budgets: tuple[str, ...]) -> str | None:
    """The smallest DLDR budget whose mean test accuracy is within WITHIN of full-budget SGD's."""
    target = summary["sgd"]["test_accuracy"] - WITHIN
    return next((b for b in budgets if summary[f"dldr {b}"]["test_accuracy"] >= target), None)


def describe(setting: Setting, lr: float, grid: dict[str, float], extra: str = "") -> str:
    """The heading of a setting's table: what ran, on which seeds, with which budgets and learning rate."""
    tried = ", ".join(f"{k}: {v:.4f}" for k, v in grid.items())
    chosen = f"lr {lr:g}, the best of a grid on seed {setting.seeds[0]} ({tried})" if len(grid) > 1 else f"lr {lr:g}"
    return (
        f"**{setting.label}** ({setting.model} on {setting.data}; seeds {', '.join(map(str, setting.seeds))}; "
        f"SGD {setting.sgd_epochs} epochs, cosine, {chosen}; {extra}"
        f"DLDR {setting.dldr or 'the README defaults'}"
        f"{f'; every method {setting.common}' if setting.common else ''})\n\n"
    )


def compare(settings: list[Setting], noises: tuple[float, ...], work: Path, extras: bool) -> dict[str, dict[str, Any]]:
    """{setting label: {"lr", "grid", noise: summary}}, printing a line per seed as it goes.

    ``extras``: every DLDR budget, the step schedule and the random subspace (the wall-clock
    comparison); without, the headline budget only (the label-noise comparison).
    """
    results: dict[str, dict[str, Any]] = {}
    for setting in settings:
        lr, grid, tuned = tune(setting, work / setting.model)
        print(f"{setting.label}: cosine SGD's lr {lr:g} (grid {grid})", flush=True)
        budgets = setting.budgets if extras else (setting.headline,)
        results[setting.label] = {"lr": lr, "grid": grid}
        for noise in noises:
            per_seed = []
            for seed in setting.seeds:
                reuse = tuned if seed == setting.seeds[0] and noise == 0 else None
                outcomes = run_methods(
                    setting, seed, noise, lr, work / f"{setting.model}-{noise}-{seed}", budgets, extras, reuse
                )
                print(_line(setting.label, noise, seed, outcomes), flush=True)
                per_seed.append(outcomes)
            results[setting.label][str(noise)] = summarize(per_seed)
    return results


def _line(label: str, noise: float, seed: int, outcomes: dict[str, Outcome]) -> str:
    """One progress line: every method's test accuracy, epochs and seconds."""
    parts = [f"{m} {o.test_accuracy:.4f} ({o.epochs} ep, {o.seconds:.1f} s)" for m, o in outcomes.items()]
    return f"{label}, noise {noise}, seed {seed}: " + "; ".join(parts)


# cosine SGD's learning-rate grid, on the first seed
LRS = (0.02, 0.05, 0.1)
PRESETS: dict[str, list[Setting]] = {
    "cpu": [Setting("digits, MLP", "mlp", "digits", 60, LRS), Setting("digits, CNN", "cnn", "digits", 60, LRS)],
    # 24 epochs, so the budgets are whole epochs: cosine SGD converges well before (LeNet-5 at lr 0.02,
    # seed 0: 0.9065 after a 10-epoch cosine, 0.9072 after a 30-epoch one). LeNet-5 (about 6 s an
    # epoch here) runs two seeds to keep the preset under an hour on 2 cores.
    "fashion": [
        Setting("Fashion-MNIST, MLP", "mlp", "fashion-mnist", 24, LRS),
        Setting("Fashion-MNIST, LeNet-5", "lenet5", "fashion-mnist", 24, LRS, seeds=(0, 1)),
    ],
    "gpu": [
        Setting(
            "CIFAR-shaped, ResNet-20",
            "cifar_resnet20",
            "synthetic:3x32x32:10",
            60,
            (0.1,),
            dldr={"snapshot_every": 0, "dim": 15},
            common={"device": "cuda"},
        ),
        Setting(
            "224 px, resnet18",
            "resnet18",
            "synthetic:3x224x224:100",
            30,
            (0.1,),
            common={"device": "cuda", "batch_size": 64, "precision": "bf16"},
        ),
    ],
    "smoke": [
        Setting(
            "digits, MLP",
            "mlp",
            "digits",
            3,
            (0.05, 0.1),
            budgets=("1/3", "2/3"),
            dldr={"snapshot_every": 1, "dim": 4, "subspace_epochs": 1},
            seeds=(0,),
        )
    ],
}

# the learning rate cosine SGD's grid picked for both Fashion-MNIST models in `dldr bench wallclock
# --preset fashion`: the label-noise and sampling presets train at it rather than run the grid again
FASHION_LR = 0.05
FASHION_AT_SGDS_LR = [replace(s, lrs=(FASHION_LR,)) for s in PRESETS["fashion"]]
