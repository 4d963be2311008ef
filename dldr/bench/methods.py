"""The training methods the wall-clock and label-noise benchmarks compare, through dldr's own phases.

==========  ==============================================================================
sgd         phase 1 alone for the full budget: SGD, the paper's baseline
sgd_early   the same on the training set minus a held-out split (as noisy as the rest),
            stopped at its best validation epoch: SGD's honest strong baseline under noise
dldr        a short phase 1, the trajectory basis (phase 2), then P-BFGS (phase 3)
psgd        the same basis, P-SGD in phase 3
random      a random basis of the same d, P-BFGS from w_0 (Li et al. 2018); its epochs and
            seconds count phases 2 and 3 only, since it uses no trajectory
==========  ==============================================================================

Every run is in-process (``--workers 0``), so the seconds are the method's, not Ray's.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dldr import phases
from dldr.config import Config

METHODS = ("sgd", "sgd_early", "dldr", "psgd", "random")


@dataclass
class Setting:
    """One model on one data set, with the budget of full SGD and the configuration of DLDR."""
    label: str
    model: str
    data: str
    sgd_epochs: int
    dldr: dict[str, Any]  # Config keys of the DLDR run: its phase 1 and phase 3
    common: dict[str, Any] = field(default_factory=dict)  # Config keys of every run (device, batch size)
    seeds: tuple[int, ...] = (0, 1, 2)
    holdout: float = 0.2


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
    return [(epochs + r["epoch"], seconds + r["seconds"], r["test_accuracy"])
            for r in run.log.records if r["phase"] == phase]


def run_methods(setting: Setting, seed: int, noise: float, work: Path) -> dict[str, Outcome]:
    """Every method once on ``setting`` with this seed and label noise; runs go under ``work``."""
    base = {**setting.common, "model": setting.model, "data": setting.data, "seed": seed, "label_noise": noise,
            "workers": 0}
    out: dict[str, Outcome] = {}

    def sgd_run(name: str, **keys: Any) -> phases.Run:
        """Phase 1 alone for the full budget, a snapshot per epoch."""
        run = phases.start_run(Config.from_dict({**base, **keys, "run_dir": str(work / name), "snapshot_every": 0,
                                                 "sample_epochs": setting.sgd_epochs}), progress=False)
        phases.sample(run)
        return run

    sgd = sgd_run("sgd")
    result = sgd.log.summary["phases"]["sample"]
    out["sgd"] = Outcome(result["test_accuracy"], setting.sgd_epochs, result["seconds"], _curve(sgd, "sample"))

    early = sgd_run("sgd_early", holdout=setting.holdout)
    records = [r for r in early.log.records if r["phase"] == "sample"]
    best = max(records, key=lambda r: (r["val_accuracy"], -r["epoch"]))  # the earliest of the best
    out["sgd_early"] = Outcome(best["test_accuracy"], best["epoch"], best["seconds"],
                               _curve(early, "sample")[:best["epoch"]])

    run_dir = str(work / "dldr")
    dldr = phases.start_run(Config.from_dict({**base, **setting.dldr, "run_dir": run_dir}), progress=False)
    sampled, basis = phases.sample(dldr), phases.basis(dldr)
    before = sampled["seconds"] + basis["seconds"]
    sample_curve = _curve(dldr, "sample")
    for name, overrides in (("dldr", {}), ("psgd", {"optimizer": "psgd"})):
        run = phases.open_run(run_dir, overrides, progress=False)
        trained = phases.train(run)
        out[name] = Outcome(trained["test_accuracy"], sampled["epochs"] + trained["epochs"],
                            before + trained["seconds"],
                            sample_curve + _curve(run, "train", sampled["epochs"], before))

    run = phases.open_run(run_dir, {"subspace": "random", "start": "first"}, progress=False)
    basis = phases.basis(run)
    trained = phases.train(run)
    out["random"] = Outcome(trained["test_accuracy"], trained["epochs"], basis["seconds"] + trained["seconds"],
                            _curve(run, "train", 0, basis["seconds"]))
    return out


def summarize(per_seed: list[dict[str, Outcome]]) -> dict[str, dict[str, Any]]:
    """Per method over the seeds: test accuracy (mean, std, each), epochs, seconds, and the
    epochs and seconds to reach full SGD's final accuracy of the same seed (mean over the seeds that did)."""
    summary = {}
    for method in METHODS:
        outcomes = [s[method] for s in per_seed]
        reached = [o.reach(s["sgd"].test_accuracy) for o, s in zip(outcomes, per_seed, strict=True)]
        hits = [r for r in reached if r is not None]
        acc = np.array([o.test_accuracy for o in outcomes])
        summary[method] = {
            "test_accuracy": float(acc.mean()), "test_accuracy_std": float(acc.std()),
            "test_accuracies": acc.tolist(), "epochs": float(np.mean([o.epochs for o in outcomes])),
            "seconds": float(np.mean([o.seconds for o in outcomes])), "reached_sgd": len(hits),
            "epochs_to_sgd": float(np.mean([h[0] for h in hits])) if hits else None,
            "seconds_to_sgd": float(np.mean([h[1] for h in hits])) if hits else None,
            "curve_seed0": outcomes[0].curve,
        }
    return summary


def describe(setting: Setting, extra: str = "") -> str:
    """The heading of a setting's table: what ran, on which seeds, with which budgets."""
    return (f"**{setting.label}** ({setting.model} on {setting.data}; seeds {', '.join(map(str, setting.seeds))}; "
            f"SGD {setting.sgd_epochs} epochs; {extra}DLDR {setting.dldr}"
            f"{f'; every method {setting.common}' if setting.common else ''})\n\n")


def grid(settings: list[Setting], noises: tuple[float, ...], work: Path) -> dict[str, dict[str, Any]]:
    """{setting label: {noise: summary}}, printing a line per seed as it goes."""
    results: dict[str, dict[str, Any]] = {}
    for setting in settings:
        for noise in noises:
            per_seed = []
            for seed in setting.seeds:
                outcomes = run_methods(setting, seed, noise, work / f"{setting.model}-{noise}-{seed}")
                print(_line(setting.label, noise, seed, outcomes), flush=True)
                per_seed.append(outcomes)
            results.setdefault(setting.label, {})[str(noise)] = summarize(per_seed)
    return results


def _line(label: str, noise: float, seed: int, outcomes: dict[str, Outcome]) -> str:
    """One progress line: every method's test accuracy, epochs and seconds."""
    parts = [f"{m} {o.test_accuracy:.4f} ({o.epochs} ep, {o.seconds:.1f} s)" for m, o in outcomes.items()]
    return f"{label}, noise {noise}, seed {seed}: " + "; ".join(parts)


# The CNN's SGD learning rate, for every method: full-budget SGD's best on clean digits among 0.1, 0.05, 0.02
# and 0.01 (test accuracy 0.977, 0.984, 0.993, 0.992, seeds 0-2). At 0.1 its BatchNorm trajectory is unstable
# under label noise and too slow to memorise the noise.
CNN = {"lr": 0.02}
DIGITS_DLDR = {"sample_epochs": 10, "snapshot_every": 2, "dim": 40, "start": "last",
               "subspace_epochs": 5, "subspace_batch_size": 512}
PRESETS: dict[str, list[Setting]] = {
    "cpu": [Setting("digits, MLP", "mlp", "digits", 60, DIGITS_DLDR),
            Setting("digits, CNN", "cnn", "digits", 60, DIGITS_DLDR, common=CNN)],
    "gpu": [Setting("CIFAR-shaped, ResNet-20", "cifar_resnet20", "synthetic:3x32x32:10", 60,
                    {"sample_epochs": 20, "snapshot_every": 0, "dim": 15, "start": "last", "subspace_epochs": 5,
                     "subspace_batch_size": 512}, common={"device": "cuda"}),
            Setting("224 px, resnet18", "resnet18", "synthetic:3x224x224:100", 30,
                    {"sample_epochs": 10, "snapshot_every": 1, "dim": 40, "start": "last", "subspace_epochs": 3},
                    common={"device": "cuda", "batch_size": 64, "precision": "bf16"})],
    "smoke": [Setting("digits, MLP", "mlp", "digits", 3,
                      {"sample_epochs": 1, "snapshot_every": 1, "dim": 4, "subspace_epochs": 1},
                      seeds=(0,))],
}
