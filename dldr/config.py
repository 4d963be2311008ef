"""The run configuration: defaults, then a YAML file, then command-line flags."""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field, fields
from typing import Any

import yaml

from dldr.errors import DldrError
from dldr.schedule import KINDS, PAPER_MILESTONES, Schedule

# phase 1 takes about this many snapshots unless --snapshot-every says otherwise (and at least --dim + 1)
SNAPSHOTS = 50
# phase 3's mini-batch is this many of phase 1's unless --subspace-batch-size says otherwise
SUBSPACE_BATCHES = 4

# --tracker: where each epoch goes besides metrics.jsonl (dldr.tracking)
TRACKERS = ("mlflow", "tensorboard")
CHOICES = {
    "start": ("first", "last", "mean"),
    "optimizer": ("pbfgs", "psgd"),
    "subspace": ("trajectory", "random"),
    "device": ("cpu", "cuda"),
    "precision": ("fp32", "bf16"),
    "basis_dtype": ("fp32", "bf16"),
    "armijo_backtrack": ("interpolate", "geometric"),
    "lr_schedule": KINDS,
}


# (field, exclusive lower bound, exclusive upper bound or None): what torch and the line search reject
# mid-run, or take without a word and diverge on, refused before anything is written
_RANGES = (("lr", 0.0, None), ("subspace_lr", 0.0, None), ("armijo_sigma", 0.0, 1.0), ("armijo_beta", 0.0, 1.0))


@dataclass
class Config:
    model: str = "mlp"
    data: str = "digits"
    run_dir: str = ""
    seed: int = 0
    device: str = "cpu"
    # where the phases run: N Ray Train workers (0: in this process, without Ray), on the
    # cluster at ``address`` (empty: RAY_ADDRESS, or else a local instance dldr starts)
    workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    address: str = ""
    max_failures: int = 0
    batch_size: int = 128
    label_noise: float = 0.0
    # a seeded fraction of the training images (labels as noisy as the rest) kept out of
    # training, logged as val_accuracy every epoch: what early stopping is judged on
    holdout: float = 0.0
    # the crop of ImageFolder data (and .beton files of it), and the processes that decode it
    image_size: int = 224
    loader_workers: int = 2
    # bf16 autocast of the forward and backward passes (fp32 master weights, snapshots and basis)
    precision: str = "fp32"
    # phase 1: SGD with momentum and weight decay, snapshots at the start and every
    # ``snapshot_every`` iterations (0: after every epoch; None: evenly spaced, about SNAPSHOTS
    # of them, so 56 on digits' 11 steps an epoch and 51 on Fashion-MNIST's 468)
    sample_epochs: int = 10
    snapshot_every: int | None = field(default=None, metadata={"type": int})
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    # the learning-rate schedule of phase 1 (and of P-SGD in phase 3), stepped every step:
    # constant, step (times lr_gamma at each of lr_milestones, fractions of the phase; empty:
    # the paper's 2/3) or cosine, after warmup_epochs of linear warm-up (``dldr.schedule``).
    # Without the warm-up, the BatchNorm cnn at lr 0.1 dies in its first epoch on Fashion-MNIST.
    lr_schedule: str = "constant"
    lr_milestones: str = ""
    lr_gamma: float = 0.1
    warmup_epochs: float = 1.0
    # phase 2: the d-dimensional basis
    dim: int = 40
    subspace: str = "trajectory"
    # phase 3: w = w_start + P c
    start: str = "last"
    optimizer: str = "pbfgs"
    # the precision phase 3 holds its rows of P in: bf16 halves the largest array of a large model
    # (P is D x d: 13.8 GB in float32 for ViT-B/16 at d = 40); products with it still sum in float32
    basis_dtype: str = "fp32"
    subspace_epochs: int = 5
    # the mini-batch of phase 3 (0: SUBSPACE_BATCHES x batch_size, as much of it as the training set
    # holds); the paper trains P-BFGS on larger batches than SGD (1024 against 128 in its code)
    subspace_batch_size: int = 0
    subspace_lr: float = 0.1
    armijo_sigma: float = 0.4
    armijo_beta: float = 0.55
    # after a failed trial: the parabola's minimiser within [0.1, beta] alpha, or the paper's beta alpha
    armijo_backtrack: str = "interpolate"
    max_trials: int = 20
    # experiment trackers, comma separated (a YAML list too): mlflow, tensorboard
    tracker: str = ""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise DldrError(f"--{f.name.replace('_', '-')} must be a finite number, got {value}")
        for name, low, high in _RANGES:
            value = getattr(self, name)
            if not ((low is None or value > low) and (high is None or value < high)):
                bounds = f"above {low:g}" if high is None else f"between {low:g} and {high:g} (exclusive)"
                raise DldrError(f"--{name.replace('_', '-')} must be {bounds}, got {value:g}")
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise DldrError(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}, "
                                f"got {getattr(self, name)!r}")
        if not 0.0 <= self.momentum < 1.0:
            raise DldrError(f"--momentum must be in [0, 1), got {self.momentum:g}")
        if not 0.0 <= self.label_noise <= 1.0:
            raise DldrError(f"--label-noise must be a fraction in [0, 1], got {self.label_noise}")
        if not 0.0 <= self.holdout < 1.0:
            raise DldrError(f"--holdout must be a fraction in [0, 1), got {self.holdout}")
        for name in ("workers", "max_failures", "gpus_per_worker", "loader_workers", "subspace_batch_size",
                     "weight_decay"):
            if getattr(self, name) < 0:
                raise DldrError(f"--{name.replace('_', '-')} must be 0 or more, got {getattr(self, name)}")
        if self.gpus_per_worker > 0 and self.device != "cuda":
            raise DldrError("--gpus-per-worker gives each worker GPUs; add --device cuda to train on them")
        for name in ("batch_size", "subspace_batch_size"):
            if self.workers and getattr(self, name) % self.workers:
                raise DldrError(f"--{name.replace('_', '-')} {getattr(self, name)} must be a multiple of "
                                f"--workers {self.workers}, so every worker gets the same share of each batch")
        for name in ("batch_size", "sample_epochs", "subspace_epochs", "max_trials", "image_size", "dim"):
            if getattr(self, name) < 1:
                raise DldrError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.cpus_per_worker <= 0:
            raise DldrError(f"--cpus-per-worker must be above 0, got {self.cpus_per_worker}")
        if self.snapshot_every is not None and self.snapshot_every < 0:
            raise DldrError(f"--snapshot-every must be 0 (each epoch) or a number of steps, got {self.snapshot_every}")
        self._check_schedule()
        unknown = [name for name in self.trackers if name not in TRACKERS]
        if unknown:
            raise DldrError(f"--tracker must be one of {', '.join(TRACKERS)}, got {unknown[0]!r}")
        if not self.run_dir:
            self.run_dir = time.strftime("runs/%Y%m%d-%H%M%S")

    def _check_schedule(self) -> None:
        milestones = self.schedule.milestones
        if not 0 < self.lr_gamma <= 1:
            raise DldrError(f"--lr-gamma must be in (0, 1], got {self.lr_gamma}")
        if self.lr_milestones and self.lr_schedule != "step":
            raise DldrError(f"--lr-milestones {self.lr_milestones} are the decays of --lr-schedule step, "
                            f"not of {self.lr_schedule}; add --lr-schedule step or leave them out")
        phases = {"--sample-epochs": self.sample_epochs}
        if self.optimizer == "psgd":
            phases["--subspace-epochs"] = self.subspace_epochs
        if self.warmup_epochs < 0:
            raise DldrError(f"--warmup-epochs must be 0 or more, got {self.warmup_epochs}")
        for flag, epochs in phases.items():
            warmup = min(self.warmup_epochs, epochs / 2)  # see dldr.schedule
            if self.lr_schedule == "step" and milestones[0] * epochs <= warmup:
                raise DldrError(f"the first --lr-milestones decay, at {milestones[0]:g} of {flag} {epochs}, falls "
                                f"inside its {warmup:g} epochs of warm-up; give a later milestone or a shorter "
                                "--warmup-epochs")

    @property
    def trackers(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(name.strip() for name in self.tracker.split(",") if name.strip()))

    @property
    def schedule(self) -> Schedule:
        """The learning-rate schedule of phase 1 (and of P-SGD in phase 3)."""
        return Schedule(self.lr_schedule, _fractions(self.lr_milestones) or PAPER_MILESTONES, self.lr_gamma,
                        self.warmup_epochs)

    def snapshot_interval(self, steps_per_epoch: int) -> int:
        """Phase 1's steps between snapshots; 0: one after every epoch."""
        if self.snapshot_every is not None:
            return self.snapshot_every
        return max(1, self.sample_epochs * steps_per_epoch // max(SNAPSHOTS, self.dim))

    def snapshot_count(self, steps_per_epoch: int) -> int:
        """The snapshots phase 1 writes: one at the start and one after every interval."""
        every = self.snapshot_interval(steps_per_epoch)
        return 1 + (self.sample_epochs if not every else self.sample_epochs * steps_per_epoch // every)

    def train_batch_size(self, train_images: int) -> int:
        """Phase 3's mini-batch on a training set of ``train_images``."""
        if self.subspace_batch_size:
            return self.subspace_batch_size
        fits = train_images // self.batch_size * self.batch_size
        return max(self.batch_size, min(SUBSPACE_BATCHES * self.batch_size, fits))

    @classmethod
    def from_dict(cls, values: dict[str, Any], base: Config | None = None, source: str = "config") -> Config:
        """``base`` (or the defaults) with ``values`` on top; unknown keys and bad types are errors."""
        merged = dataclasses.asdict(base) if base else {}
        return cls(**{**merged, **_typed(cls, values, source)})

    @classmethod
    def read_yaml(cls, text: str, source: str) -> dict[str, Any]:
        """The keys a run's config.yaml sets, checked against the known keys and types."""
        values = _mapping(text, source)
        cls.from_dict(values, source=source)
        return values

    def to_yaml(self) -> str:
        return yaml.safe_dump(dataclasses.asdict(self), sort_keys=False)


@dataclass
class Resources:
    """A job spec's ``resources``: what the job's driver reserves on the cluster.

    The driver is the entrypoint process (``dldr fit``): it runs phase 2's eigen-decomposition
    and records the run. The workers' share is the config's ``workers`` x ``cpus_per_worker``
    and ``gpus_per_worker``; ``dldr fit --config`` reads a spec and ignores this section.
    """
    entrypoint_cpus: float = 0.0
    entrypoint_gpus: float = 0.0
    entrypoint_memory_gb: float = 0.0

    def __post_init__(self) -> None:
        for f in fields(self):
            if getattr(self, f.name) < 0:
                raise DldrError(f"resources: {f.name} must be 0 or more, got {getattr(self, f.name)}")


RESOURCES = "resources"


def field_type(f: Any) -> type:
    """The type a configuration value is converted to: the default's, or the one a None default names."""
    return f.metadata.get("type", type(f.default))


def read_spec(text: str, source: str) -> tuple[dict[str, Any], Resources]:
    """A job spec (or a ``--config`` file): configuration keys, plus an optional ``resources`` mapping."""
    values = _mapping(text, source)
    resources = values.pop(RESOURCES, None) or {}
    if not isinstance(resources, dict):
        raise DldrError(f"{source}: resources must be a mapping of keys to values")
    Config.from_dict(values, source=source)
    return values, Resources(**_typed(Resources, resources, f"{source}: resources"))


def _fractions(text: str) -> tuple[float, ...]:
    """``--lr-milestones``: increasing fractions in (0, 1), comma separated."""
    try:
        values = tuple(float(v) for v in text.split(",")) if text.strip() else ()
    except ValueError:
        values = (-1.0,)
    if any(not 0 < v < 1 for v in values) or list(values) != sorted(set(values)):
        raise DldrError(f"--lr-milestones must be increasing fractions of the phase in (0, 1), comma separated "
                        f"(e.g. 0.5,0.75 for epochs 50 and 75 of 100), got {text!r}")
    return values


def _mapping(text: str, source: str) -> dict[str, Any]:
    try:
        values = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or " ".join(str(e).split())
        raise DldrError(f"{source} is not valid YAML ({problem}{where}); fix it") from None
    if not isinstance(values, dict):
        raise DldrError(f"{source} must be a mapping of keys to values")
    return values


def _typed(cls: type, values: dict[str, Any], source: str) -> dict[str, Any]:
    """``values`` checked against the types of ``cls``'s fields, strictly: an int key takes only integers,
    a float key integers or decimals, a bool is never a number, and null only where the default is null.
    An unknown key or a wrong type is an error that names the key."""
    known = {f.name: f for f in fields(cls)}
    typed = {}
    for key, value in values.items():
        if key not in known:
            raise DldrError(f"{source}: unknown key {key!r}; known keys: {', '.join(known)}")
        kind = field_type(known[key])
        if value is None and known[key].default is None:
            typed[key] = None
            continue
        if kind is str and key in _LISTS and isinstance(value, list) \
                and all(_is(_LISTS[key], v) for v in value):  # a YAML list of milestones or trackers
            value = ",".join(map(str, value))
        if not _is(kind, value):
            shown = "null" if value is None else repr(value)
            raise DldrError(f"{source}: {key} must be {_KIND_NAMES.get(kind, kind.__name__)}, got {shown}")
        typed[key] = kind(value)
    return typed


_LISTS = {"lr_milestones": float, "tracker": str}  # string keys that a YAML list may give, and its items' type
_KIND_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _is(kind: type, value: Any) -> bool:
    """Whether ``value`` (from YAML or the command line) is a ``kind`` without a lossy conversion."""
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)
