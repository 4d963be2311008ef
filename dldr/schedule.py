"""Learning-rate schedules of phase 1's SGD and phase 3's P-SGD, from ``torch.optim.lr_scheduler``.

A schedule is stepped once per optimizer step, so it does not depend on how long an epoch is,
and its state goes into the phase's checkpoint, so a resumed run follows the same curve. With
T steps in the phase, W = min(round(warmup_epochs x steps per epoch), T // 2) of them warming
up (a phase shorter than twice the warm-up warms up for its first half), the learning rate of
step t (counted from 0) is

* warm-up, t < W: lr x (WARMUP_START + (1 - WARMUP_START) t / W)  (``LinearLR``)
* ``constant``: lr
* ``step``: lr x gamma^k, k the number of milestones m with t >= round(m T)  (``MultiStepLR``;
  the configuration puts every milestone after the warm-up)
* ``cosine``: lr x (1 + cos(pi (t - W) / (T - W))) / 2  (``CosineAnnealingLR`` to 0)

Milestones are fractions of the phase, so one schedule fits a phase of any length; the paper's
step schedule decays once, by 0.1, two thirds of the way (epoch 100 of 150).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.optim import Optimizer
from torch.optim.lr_scheduler import ConstantLR, CosineAnnealingLR, LinearLR, LRScheduler, MultiStepLR, SequentialLR

KINDS = ("constant", "step", "cosine")
PAPER_MILESTONES = (2 / 3,)
# the warm-up starts at this fraction of the learning rate
WARMUP_START = 0.01


@dataclass(frozen=True)
class Schedule:
    kind: str = "constant"
    milestones: tuple[float, ...] = PAPER_MILESTONES
    gamma: float = 0.1
    warmup_epochs: float = 0.0

    def steps(self, steps_per_epoch: int, epochs: int) -> tuple[int, list[int]]:
        """(warm-up steps, the steps at which a step schedule decays) of a phase of ``epochs``."""
        total = steps_per_epoch * epochs
        warmup = min(round(self.warmup_epochs * steps_per_epoch), total // 2)
        return warmup, [round(m * total) for m in self.milestones]

    def build(self, optimizer: Optimizer, steps_per_epoch: int, epochs: int) -> LRScheduler:
        """The scheduler of a phase of ``epochs`` epochs of ``steps_per_epoch`` steps each."""
        total = steps_per_epoch * epochs
        warmup, decays = self.steps(steps_per_epoch, epochs)
        if self.kind == "cosine":
            main: LRScheduler = CosineAnnealingLR(optimizer, T_max=total - warmup, eta_min=0.0)
        elif self.kind == "step":
            main = MultiStepLR(optimizer, [max(d - warmup, 1) for d in decays], gamma=self.gamma)
        else:
            main = ConstantLR(optimizer, factor=1.0, total_iters=0)
        if not warmup:
            return main
        ramp = LinearLR(optimizer, start_factor=WARMUP_START, end_factor=1.0, total_iters=warmup)
        return SequentialLR(optimizer, [ramp, main], milestones=[warmup])
