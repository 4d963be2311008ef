"""The run configuration: defaults, then a YAML file, then command-line flags."""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, fields
from typing import Any

import yaml

from dldr.errors import DldrError

CHOICES = {
    "start": ("first", "last", "mean"),
    "optimizer": ("pbfgs", "psgd"),
    "subspace": ("trajectory", "random"),
    "device": ("cpu", "cuda"),
    "precision": ("fp32", "bf16"),
    "armijo_backtrack": ("interpolate", "geometric"),
}


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
    # ``snapshot_every`` iterations (0: after every epoch). The defaults suit the small digits
    # set (11 steps an epoch, so 56 snapshots); large data sets snapshot once an epoch or less.
    sample_epochs: int = 10
    snapshot_every: int = 2
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    # phase 2: the d-dimensional basis
    dim: int = 40
    subspace: str = "trajectory"
    # phase 3: w = w_start + P c
    start: str = "mean"
    optimizer: str = "pbfgs"
    subspace_epochs: int = 10
    # the mini-batch of phase 3 (0: batch_size); the paper trains P-BFGS on larger batches
    subspace_batch_size: int = 0
    subspace_lr: float = 0.1
    armijo_sigma: float = 0.4
    armijo_beta: float = 0.55
    # after a failed trial: the parabola's minimiser within [0.1, beta] alpha, or the paper's beta alpha
    armijo_backtrack: str = "interpolate"
    max_trials: int = 20

    def __post_init__(self) -> None:
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise DldrError(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}, "
                                f"got {getattr(self, name)!r}")
        if not 0.0 <= self.label_noise <= 1.0:
            raise DldrError(f"--label-noise must be a fraction in [0, 1], got {self.label_noise}")
        if not 0.0 <= self.holdout < 1.0:
            raise DldrError(f"--holdout must be a fraction in [0, 1), got {self.holdout}")
        for name in ("workers", "max_failures", "gpus_per_worker", "loader_workers", "subspace_batch_size"):
            if getattr(self, name) < 0:
                raise DldrError(f"--{name.replace('_', '-')} must be 0 or more, got {getattr(self, name)}")
        if self.gpus_per_worker > 0 and self.device != "cuda":
            raise DldrError("--gpus-per-worker gives each worker GPUs; add --device cuda to train on them")
        for name in ("batch_size", "subspace_batch_size"):
            if self.workers and getattr(self, name) % self.workers:
                raise DldrError(f"--{name.replace('_', '-')} {getattr(self, name)} must be a multiple of "
                                f"--workers {self.workers}, so every worker gets the same share of each batch")
        for name in ("batch_size", "sample_epochs", "subspace_epochs", "max_trials", "image_size"):
            if getattr(self, name) < 1:
                raise DldrError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.cpus_per_worker <= 0:
            raise DldrError(f"--cpus-per-worker must be above 0, got {self.cpus_per_worker}")
        if self.snapshot_every < 0:
            raise DldrError(f"--snapshot-every must be 0 (each epoch) or a number of steps, got {self.snapshot_every}")
        if not self.run_dir:
            self.run_dir = time.strftime("runs/%Y%m%d-%H%M%S")

    @property
    def train_batch_size(self) -> int:
        """Phase 3's mini-batch."""
        return self.subspace_batch_size or self.batch_size

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


def read_spec(text: str, source: str) -> tuple[dict[str, Any], Resources]:
    """A job spec (or a ``--config`` file): configuration keys, plus an optional ``resources`` mapping."""
    values = _mapping(text, source)
    resources = values.pop(RESOURCES, None) or {}
    if not isinstance(resources, dict):
        raise DldrError(f"{source}: resources must be a mapping of keys to values")
    Config.from_dict(values, source=source)
    return values, Resources(**_typed(Resources, resources, f"{source}: resources"))


def _mapping(text: str, source: str) -> dict[str, Any]:
    try:
        values = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise DldrError(f"{source} is not valid YAML: {e}") from None
    if not isinstance(values, dict):
        raise DldrError(f"{source} must be a mapping of keys to values")
    return values


def _typed(cls: type, values: dict[str, Any], source: str) -> dict[str, Any]:
    """``values`` converted to the types of ``cls``'s fields; an unknown key is an error that names it."""
    known = {f.name: f for f in fields(cls)}
    typed = {}
    for key, value in values.items():
        if key not in known:
            raise DldrError(f"{source}: unknown key {key!r}; known keys: {', '.join(known)}")
        kind = type(known[key].default)
        try:
            typed[key] = kind(value)
        except (TypeError, ValueError):
            raise DldrError(f"{source}: {key} must be a {kind.__name__}, got {value!r}") from None
    return typed
