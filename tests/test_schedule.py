"""Learning-rate schedules: every step's rate against its closed form, the configuration's checks,
and a phase 1 stopped mid-schedule that resumes onto the snapshots of an unbroken run."""

import io
import math

import pytest
import torch

from dldr import phases
from dldr.config import Config
from dldr.errors import DldrError
from dldr.schedule import WARMUP_START, Schedule
from dldr.store import RunStore

LR, SPE, EPOCHS = 0.4, 7, 6  # a phase of 42 steps
TOTAL = SPE * EPOCHS


def _rates(schedule: Schedule) -> list[float]:
    """The learning rate each of the phase's steps is taken with."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR, momentum=0.9)
    scheduler = schedule.build(opt, SPE, EPOCHS)
    rates = []
    for _ in range(TOTAL):
        rates.append(opt.param_groups[0]["lr"])
        assert scheduler.get_last_lr() == [rates[-1]]
        opt.step()
        scheduler.step()
    return rates


def _warm(t: int, warmup: int) -> float:
    return WARMUP_START + (1 - WARMUP_START) * t / warmup


@pytest.mark.parametrize("warmup_epochs", [0, 1, 1.5, 4])
def test_each_schedule_follows_its_closed_form(warmup_epochs):
    w = min(round(warmup_epochs * SPE), TOTAL // 2)  # 4 epochs of 6: the first half
    expected = {
        "constant": [LR * (_warm(t, w) if t < w else 1) for t in range(TOTAL)],
        "cosine": [
            LR * (_warm(t, w) if t < w else (1 + math.cos(math.pi * (t - w) / (TOTAL - w))) / 2) for t in range(TOTAL)
        ],
        # decays by 0.3 at step round(0.6 * 42) = 25 and round(0.8 * 42) = 34
        "step": [LR * (_warm(t, w) if t < w else 0.3 ** ((t >= 25) + (t >= 34))) for t in range(TOTAL)],
    }
    for kind, rates in expected.items():
        schedule = Schedule(kind, (0.6, 0.8), 0.3, warmup_epochs)
        assert _rates(schedule) == pytest.approx(rates, rel=1e-9, abs=1e-12), kind


def test_the_default_step_schedule_is_the_papers():
    """lr 0.1 until two thirds of the phase (epoch 100 of 150), then 0.01."""
    cfg = Config(lr_schedule="step", lr=LR, warmup_epochs=0)
    rates = _rates(cfg.schedule)
    assert rates[:28] == [LR] * 28 and rates[28:] == pytest.approx([LR * 0.1] * 14)


def test_a_resumed_scheduler_continues_the_curve():
    schedule = Schedule("cosine", warmup_epochs=1)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR, momentum=0.9)
    scheduler = schedule.build(opt, SPE, EPOCHS)
    for _ in range(10):
        opt.step()
        scheduler.step()
    saved = (opt.state_dict(), scheduler.state_dict())
    again = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR, momentum=0.9)
    resumed = schedule.build(again, SPE, EPOCHS)
    again.load_state_dict(saved[0])
    resumed.load_state_dict(saved[1])
    assert [again.param_groups[0]["lr"]] == scheduler.get_last_lr()
    for _ in range(TOTAL - 10):
        opt.step(), scheduler.step(), again.step(), resumed.step()
        assert again.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


@pytest.mark.parametrize(
    "keys, message",
    [
        ({"lr_milestones": "0.5"}, "--lr-milestones 0.5 are the decays of --lr-schedule step, not of constant"),
        (
            {"lr_schedule": "step", "lr_milestones": "0.75,0.5"},
            "must be increasing fractions of the phase in \\(0, 1\\)",
        ),
        ({"lr_schedule": "step", "lr_milestones": "60"}, "must be increasing fractions"),
        ({"lr_schedule": "step", "lr_milestones": "half"}, "must be increasing fractions"),
        ({"lr_gamma": 1.5}, "--lr-gamma must be in \\(0, 1\\], got 1.5"),
        ({"warmup_epochs": -1}, "--warmup-epochs must be 0 or more, got -1"),
        (
            {"lr_schedule": "step", "lr_milestones": "0.1", "warmup_epochs": 1},
            "the first --lr-milestones decay, at 0.1 of --sample-epochs 10, falls inside its 1 epochs of warm-up",
        ),
        (
            {"lr_schedule": "step", "lr_milestones": "0.25,0.9", "optimizer": "psgd", "subspace_epochs": 2},
            "at 0.25 of --subspace-epochs 2, falls inside its 1 epochs of warm-up",
        ),
        ({"lr_schedule": "linear"}, "--lr-schedule must be one of constant, step, cosine"),
    ],
)
def test_a_schedule_that_cannot_run_is_refused(keys, message):
    with pytest.raises(DldrError, match=message):
        Config(**keys)


def test_milestones_from_yaml_as_a_list():
    cfg = Config.from_dict(Config.read_yaml("lr_schedule: step\nlr_milestones: [0.5, 0.75]\n", "spec.yaml"))
    assert cfg.schedule.milestones == (0.5, 0.75)


class _Checkpoints(phases.Session):
    """Keeps phase 1's per-epoch checkpoints in memory, as Ray Train keeps them on disk, and can stop the
    run like a killed worker after a given step; a later run resumes from the last checkpoint."""

    def __init__(self, stop_at=None, saved=None):
        self.stop_at, self.saved = stop_at, saved

    def restore(self):
        return self.saved

    def report(self, metrics, state=None):
        if state is not None:  # saved as Ray's session saves it, not a view of tensors that keep training
            buffer = io.BytesIO()
            torch.save(state, buffer)
            self.saved = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)

    def after_step(self, step):
        if step == self.stop_at:
            raise KeyboardInterrupt


def test_phase_one_stopped_mid_schedule_resumes_onto_the_same_snapshots(tmp_path):
    keys = {
        "workers": 0,
        "sample_epochs": 4,
        "snapshot_every": 3,
        "lr_schedule": "cosine",
        "warmup_epochs": 1.5,
        "model": "cnn",
        "lr": 0.05,
    }
    unbroken = phases.start_run(Config(run_dir=str(tmp_path / "unbroken"), **keys), progress=False)
    phases.sample(unbroken)

    broken = phases.start_run(Config(run_dir=str(tmp_path / "broken"), **keys), progress=False)
    broken.session = _Checkpoints(stop_at=27)  # in epoch 3 of 4 (11 steps an epoch), past the warm-up
    with pytest.raises(KeyboardInterrupt):
        phases.sample(broken)
    assert len(broken.session.saved["shared"]["snapshot_files"]) == 1 + 22 // 3  # the checkpoint of epoch 2
    resumed = phases.open_run(broken.store.url, {}, progress=False)
    resumed.session = _Checkpoints(saved=broken.session.saved)
    phases.sample(resumed)

    a, b = RunStore(unbroken.store.url), RunStore(resumed.store.url)
    assert a.files("snapshots/") == b.files("snapshots/") and len(a.files("snapshots/")) == 1 + 44 // 3
    assert [a.checksum(f) for f in a.files("snapshots/")] == [b.checksum(f) for f in b.files("snapshots/")]
    assert [r["lr"] for r in _records(a)][-2:] == [r["lr"] for r in _records(b)][-2:]


def _records(store: RunStore) -> list[dict]:
    import json

    return [
        json.loads(line)
        for line in store.read_bytes("metrics.jsonl").decode().splitlines()
        if '"sample"' in line and '"epoch"' in line
    ]
