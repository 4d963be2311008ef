"""Time per optimizer step of SGD, P-SGD and P-BFGS on the same model, start point and batches.

A short DLDR run (phases 1 and 2) gives a real basis and start point, so P-BFGS's line search
sees the landscape phase 3 sees. Each optimizer then takes the same steps from w_start on
the same batches (phase 3's), interleaved, timed piece by piece: the closure with gradients (forward + backward),
the closure without (a line-search trial forward), the projection P^T g and the lift P p.
The floor of a P-BFGS step is one forward + backward plus one trial forward.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from dldr import phases
from dldr.bench import report
from dldr.config import Config
from dldr.data import DataSource
from dldr.params import trainable

OPTIMIZERS = ("sgd", "psgd", "pbfgs")


@dataclass
class Setting:
    label: str
    config: dict[str, Any]  # the DLDR run whose basis and start point the steps use
    steps: int = 100
    warmup: int = 5


@dataclass
class Timer:
    """Seconds spent in each timed piece, synchronising the GPU around each one."""

    device: torch.device
    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def wrap(self, fn: Callable[..., Any], name: Callable[[], str] | str) -> Callable[..., Any]:
        def timed(*args: Any) -> Any:
            self.sync()
            start = time.perf_counter()
            out = fn(*args)
            self.sync()
            key = name() if callable(name) else name
            self.seconds[key] += time.perf_counter() - start
            self.calls[key] += 1
            return out

        return timed


# the CNN trains at lr 0.02 on digits: at 0.1 its BatchNorm trajectory was unstable (see wallclock's grid)
CNN = {"lr": 0.02}
_DIGITS = {
    "data": "digits",
    "sample_epochs": 10,
    "snapshot_every": 2,
    "dim": 40,
    "start": "last",
    "batch_size": 128,
    "subspace_batch_size": 128,
}
PRESETS: dict[str, list[Setting]] = {
    "cpu": [
        Setting("digits, MLP", {**_DIGITS, "model": "mlp"}),
        Setting("digits, CNN", {**_DIGITS, **CNN, "model": "cnn"}),
        Setting("digits, CNN, batch 512", {**_DIGITS, **CNN, "model": "cnn", "subspace_batch_size": 512}),
    ],
    "gpu": [
        Setting(
            "CIFAR-shaped, ResNet-20, batch 128",
            {
                "model": "cifar_resnet20",
                "data": "synthetic:3x32x32:10",
                "sample_epochs": 11,
                "snapshot_every": 1,
                "dim": 40,
                "start": "last",
                "subspace_batch_size": 128,
                "device": "cuda",
            },
        ),
        Setting(
            "224 px, resnet18, batch 256, bf16",
            {
                "model": "resnet18",
                "data": "synthetic:3x224x224:100:1024",
                "batch_size": 256,
                "precision": "bf16",
                "sample_epochs": 11,
                "snapshot_every": 1,
                "dim": 40,
                "start": "last",
                "subspace_batch_size": 256,
                "device": "cuda",
            },
            steps=20,
        ),
    ],
    "smoke": [
        Setting(
            "digits, MLP",
            {**_DIGITS, "model": "mlp", "sample_epochs": 1, "snapshot_every": 1, "dim": 4},
            steps=3,
            warmup=1,
        )
    ],
}


@dataclass
class _Contender:
    model: torch.nn.Module
    opt: torch.optim.Optimizer
    timer: Timer
    trials_before: int = 0

    @property
    def trials(self) -> int:
        return self.opt.state[self.opt.param_groups[0]["params"][0]].get("trials", 0)


def _contender(run: phases.Run, data: DataSource, name: str) -> _Contender:
    """A model at the run's w_start and optimizer ``name`` over it, its projections timed."""
    cfg = run.cfg
    model = phases.build_model(run, data)
    subspace = phases.load_subspace(run, model)  # sets the model to w_start
    model.train()
    timer = Timer(run.device)
    if name == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(
            trainable(model), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    else:
        opt = phases.make_optimizer(Config.from_dict({"optimizer": name}, base=cfg), model, subspace)
        subspace.project = timer.wrap(subspace.project, "projection")
        subspace.lift = timer.wrap(subspace.lift, "projection")
    return _Contender(model, opt, timer)


def _steps(
    run: phases.Run, data: DataSource, batches: list[tuple[torch.Tensor, torch.Tensor]], warmup: int
) -> dict[str, Any]:
    """Every optimizer takes the same steps, interleaved batch by batch so that the machine's
    ups and downs fall on all of them alike; the first ``warmup`` steps are not timed."""
    contenders = {name: _contender(run, data, name) for name in OPTIMIZERS}
    for i, (x, y) in enumerate(batches):
        for c in contenders.values():
            if i == warmup:
                c.timer.seconds.clear()
                c.timer.calls.clear()
                c.trials_before = c.trials
            loss = c.timer.wrap(
                phases.closure(run, c.opt, c.model, x, y),
                lambda: "forward_backward" if torch.is_grad_enabled() else "trial_forward",
            )
            c.timer.wrap(c.opt.step, "step")(loss)
    n, results = len(batches) - warmup, {}
    for name, c in contenders.items():
        per_step = {k: v / n for k, v in c.timer.seconds.items()}
        per_step["other"] = per_step["step"] - sum(v for k, v in per_step.items() if k != "step")
        trial_calls = max(c.timer.calls["trial_forward"], 1)
        results[name] = {
            "seconds_per_step": per_step["step"],
            "breakdown": per_step,
            "mean_trials": (c.trials - c.trials_before) / n,
            "trial_forward_seconds": c.timer.seconds["trial_forward"] / trial_calls,
        }
    return results


def sampled(setting: Setting, run_dir: Path) -> phases.Run:
    """A new run of ``setting.config`` through phases 1 and 2, in-process."""
    run = phases.start_run(Config.from_dict({**setting.config, "workers": 0, "run_dir": str(run_dir)}), progress=False)
    phases.sample(run)
    phases.basis(run)
    return run


def measure(run: phases.Run, setting: Setting) -> dict[str, Any]:
    """``setting``'s steps of every optimizer on ``run``'s basis and start point (phases 1 and 2 done)."""
    cfg = run.cfg
    data = phases.load_data(cfg)
    batches: list[tuple[torch.Tensor, torch.Tensor]] = []
    epoch = 1
    while len(batches) < setting.warmup + setting.steps:  # phase 3's batches, epoch after epoch
        batches += [
            (run.inputs(x), y.to(run.device))
            for x, y in data.train_batches(cfg.train_batch_size(len(data.train_labels)), cfg.seed + 1, epoch)
        ]
        epoch += 1
    batches = batches[: setting.warmup + setting.steps]
    r = _steps(run, data, batches, setting.warmup)
    sgd, pbfgs = r["sgd"]["seconds_per_step"], r["pbfgs"]
    floor = pbfgs["breakdown"]["forward_backward"] + pbfgs["trial_forward_seconds"]
    r["ratios"] = {
        "pbfgs_over_sgd": pbfgs["seconds_per_step"] / sgd,
        "psgd_over_sgd": r["psgd"]["seconds_per_step"] / sgd,
        "pbfgs_over_floor": pbfgs["seconds_per_step"] / floor,
        "floor_seconds": floor,
    }
    r["device"] = str(run.device)
    r["batch_size"] = cfg.train_batch_size(len(data.train_labels))
    print(
        f"{setting.label}: SGD {1e3 * sgd:.2f} ms, P-SGD {1e3 * r['psgd']['seconds_per_step']:.2f} ms, "
        f"P-BFGS {1e3 * pbfgs['seconds_per_step']:.2f} ms ({pbfgs['mean_trials']:.2f} trials/step); P-BFGS / SGD "
        f"{r['ratios']['pbfgs_over_sgd']:.2f}, P-BFGS / floor {r['ratios']['pbfgs_over_floor']:.2f}",
        flush=True,
    )
    return r


def run(preset: str, work: Path) -> tuple[dict, dict, str, Figure]:
    settings = PRESETS[preset]
    results = {s.label: measure(sampled(s, work / f"run-{i}"), s) for i, s in enumerate(settings)}
    return {s.label: asdict(s) for s in settings}, results, markdown(settings, results), figure(results)


PIECES = ("forward_backward", "trial_forward", "projection", "other")


def markdown(settings: list[Setting], results: dict[str, Any]) -> str:
    text = ""
    for setting in settings:
        r = results[setting.label]
        rows = [
            [
                name,
                f"{1e3 * r[name]['seconds_per_step']:.3f}",
                *(f"{1e3 * r[name]['breakdown'].get(p, 0.0):.3f}" for p in PIECES),
                f"{r[name]['mean_trials']:.2f}" if name == "pbfgs" else "-",
            ]
            for name in OPTIMIZERS
        ]
        q = r["ratios"]
        text += (
            f"**{setting.label}** ({setting.config['model']}, batch {r['batch_size']}, d = {setting.config['dim']}, "
            f"{r['device']}; mean of {setting.steps} steps after {setting.warmup})\n\n"
        )
        text += report.table(["optimizer", "ms / step", *(f"{p} ms" for p in PIECES), "trials / step"], rows)
        text += (
            f"\nP-BFGS / SGD = **{q['pbfgs_over_sgd']:.2f}**, P-SGD / SGD = {q['psgd_over_sgd']:.2f}, "
            f"P-BFGS / floor (one forward + backward + one trial forward = {1e3 * q['floor_seconds']:.3f} ms) "
            f"= {q['pbfgs_over_floor']:.2f}\n\n"
        )
    return text


def figure(results: dict[str, Any]) -> Figure:
    def draw(ax: Any, r: dict[str, Any]) -> None:
        bottom = np.zeros(len(OPTIMIZERS))
        for piece in PIECES:
            values = np.array([1e3 * r[name]["breakdown"].get(piece, 0.0) for name in OPTIMIZERS])
            ax.bar(OPTIMIZERS, values, bottom=bottom, label=piece)
            bottom += values
        ax.set(ylabel="ms per step")

    return report.panels(results, draw)
