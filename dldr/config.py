"""The run configuration: defaults, then a YAML file, then command-line flags."""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable
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
AUTO = "auto"  # a None default decided when the run starts (--workers)


# (field, exclusive lower bound, exclusive upper bound or None): what torch and the line search reject
# mid-run, or take without a word and diverge on, refused before anything is written
_RANGES = (("lr", 0.0, None), ("subspace_lr", 0.0, None), ("armijo_sigma", 0.0, 1.0), ("armijo_beta", 0.0, 1.0))


def option(
    default: Any,
    help: str,
    *,
    choices: tuple[str, ...] | None = None,
    shown: str | None = None,
    kind: type | None = None,
) -> Any:
    """A Config field with what ``--help`` and the README say of it: its help text, its allowed values,
    how its default reads (``shown``) and, for a None default, the type of its values (``kind``)."""
    metadata = {"help": help, "choices": choices, "shown": shown, "type": kind}
    return field(default=default, metadata={k: v for k, v in metadata.items() if v is not None})


@dataclass
class Config:
    """Every setting of a run; a field's help text is the one ``dldr --help`` and the README show."""

    model: str = option(
        "mlp", "timm model name, or one dldr registers: mlp, cnn, lenet5, cnn_pool, cifar_resnet20/32/44/56/110"
    )
    data: str = option(
        "digits",
        "data set: digits (bundled), fashion-mnist[:DIR], mnist:DIR, kmnist:DIR, "
        "cifar10:DIR, cifar100:DIR, imagefolder:DIR, ffcv:TRAIN.beton,VAL.beton or "
        "synthetic:CxHxW:K[:N]",
    )
    run_dir: str = option("", "run directory: a local path or an fsspec URL (s3://bucket/run)", shown="runs/<time>")
    seed: int = option(0, "random seed")
    device: str = option(
        "cpu",
        "torch device (with Ray Train workers, cuda gives each --gpus-per-worker GPUs, default 1)",
        choices=("cpu", "cuda"),
    )
    workers: int | None = option(
        None,
        "Ray Train workers; 0 runs every phase in this process without Ray; auto: "
        "0, or 1 when --address or RAY_ADDRESS names a cluster",
        shown="auto",
        kind=int,
    )
    cpus_per_worker: float = option(1.0, "CPUs each Ray Train worker reserves (torch uses as many threads)")
    gpus_per_worker: float = option(0.0, "GPUs per Ray Train worker (needs --device cuda)")
    address: str = option("", "Ray cluster address host:port", shown="RAY_ADDRESS, else a local instance")
    max_failures: int = option(0, "worker-group failures a command survives by restarting from its last checkpoint")
    batch_size: int = option(128, "mini-batch size of phase 1")
    label_noise: float = option(0.0, "fraction of training labels replaced by a uniformly drawn class")
    holdout: float = option(
        0.0,
        "fraction of the training images held out (its labels as noisy as the rest), "
        "logged as val_accuracy: what early stopping is judged on",
    )
    image_size: int = option(224, "crop size of imagefolder and ffcv data")
    loader_workers: int = option(2, "image decoding processes (ffcv: threads) of imagefolder and ffcv data")
    precision: str = option(
        "fp32", "fp32, or bf16 autocast (fp32 weights, snapshots and basis)", choices=("fp32", "bf16")
    )
    sample_epochs: int = option(10, "SGD epochs of phase 1")
    snapshot_every: int | None = option(
        None,
        "snapshot every K SGD steps; 0 = at the start and after every epoch",
        shown=f"evenly spaced, about max({SNAPSHOTS}, --dim) snapshots",
        kind=int,
    )
    lr: float = option(0.1, "SGD learning rate of phase 1")
    momentum: float = option(0.9, "momentum of SGD and P-SGD")
    weight_decay: float = option(1e-4, "SGD weight decay of phase 1")
    lr_schedule: str = option(
        "constant", "learning-rate schedule of phase 1 (and of P-SGD), stepped every step", choices=KINDS
    )
    lr_milestones: str = option(
        "",
        "fractions of the phase at which --lr-schedule step multiplies the learning "
        "rate by --lr-gamma, comma separated",
        shown="0.667, the paper's",
    )
    lr_gamma: float = option(0.1, "factor of each --lr-schedule step decay")
    warmup_epochs: float = option(1.0, "epochs of linear learning-rate warm-up before the schedule (may be fractional)")
    dim: int = option(40, "subspace dimension d")
    subspace: str = option(
        "trajectory", "the DLDR basis, or random directions (for comparison)", choices=("trajectory", "random")
    )
    start: str = option("last", "w_start: the first or last snapshot, or their mean", choices=("first", "last", "mean"))
    optimizer: str = option("pbfgs", "phase 3 optimizer", choices=("pbfgs", "psgd"))
    basis_dtype: str = option(
        "fp32",
        "precision phase 3 holds P in: fp32, or bf16 (half the memory; products sum in fp32)",
        choices=("fp32", "bf16"),
    )
    subspace_epochs: int = option(5, "epochs of phase 3")
    subspace_batch_size: int = option(
        0, "mini-batch size of phase 3", shown=f"{SUBSPACE_BATCHES} x --batch-size, at most the training set"
    )
    subspace_lr: float = option(0.1, "P-SGD learning rate of phase 3")
    armijo_sigma: float = option(0.4, "P-BFGS sufficient-decrease constant")
    armijo_beta: float = option(0.55, "P-BFGS backtracking factor (the most a failed trial's step is kept)")
    armijo_backtrack: str = option(
        "interpolate",
        "P-BFGS step after a failed trial: interpolated within "
        "[0.1, beta] alpha, or geometric beta alpha (the paper's)",
        choices=("interpolate", "geometric"),
    )
    max_trials: int = option(20, "P-BFGS line-search trials per step")
    tracker: str = option(
        "",
        "also log every epoch to mlflow (MLFLOW_TRACKING_URI, else ./mlflow.db) or "
        "tensorboard (event files in the run directory); give it twice for both",
        choices=TRACKERS,
        shown="none",
    )

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
        for f in fields(self):
            allowed = f.metadata.get("choices")
            if allowed and f.name != "tracker" and getattr(self, f.name) not in allowed:
                raise DldrError(
                    f"--{f.name.replace('_', '-')} must be one of {', '.join(allowed)}, got {getattr(self, f.name)!r}"
                )
        if not 0.0 <= self.momentum < 1.0:
            raise DldrError(f"--momentum must be in [0, 1), got {self.momentum:g}")
        if not 0.0 <= self.label_noise <= 1.0:
            raise DldrError(f"--label-noise must be a fraction in [0, 1], got {self.label_noise}")
        if self.workers is None:  # auto
            self.workers = 1 if self.address or os.environ.get("RAY_ADDRESS") else 0
        if not 0.0 <= self.holdout < 1.0:
            raise DldrError(f"--holdout must be a fraction in [0, 1), got {self.holdout}")
        for name in (
            "workers",
            "max_failures",
            "gpus_per_worker",
            "loader_workers",
            "subspace_batch_size",
            "weight_decay",
        ):
            if getattr(self, name) < 0:
                raise DldrError(f"--{name.replace('_', '-')} must be 0 or more, got {getattr(self, name)}")
        if self.gpus_per_worker > 0 and self.device != "cuda":
            raise DldrError("--gpus-per-worker gives each worker GPUs; add --device cuda to train on them")
        for name in ("batch_size", "subspace_batch_size"):
            if self.workers and getattr(self, name) % self.workers:
                raise DldrError(
                    f"--{name.replace('_', '-')} {getattr(self, name)} must be a multiple of "
                    f"--workers {self.workers}, so every worker gets the same share of each batch"
                )
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
            raise DldrError(
                f"--lr-milestones {self.lr_milestones} are the decays of --lr-schedule step, "
                f"not of {self.lr_schedule}; add --lr-schedule step or leave them out"
            )
        phases = {"--sample-epochs": self.sample_epochs}
        if self.optimizer == "psgd":
            phases["--subspace-epochs"] = self.subspace_epochs
        if self.warmup_epochs < 0:
            raise DldrError(f"--warmup-epochs must be 0 or more, got {self.warmup_epochs}")
        for flag, epochs in phases.items():
            warmup = min(self.warmup_epochs, epochs / 2)  # see dldr.schedule
            if self.lr_schedule == "step" and milestones[0] * epochs <= warmup:
                raise DldrError(
                    f"the first --lr-milestones decay, at {milestones[0]:g} of {flag} {epochs}, falls "
                    f"inside its {warmup:g} epochs of warm-up; give a later milestone or a shorter "
                    "--warmup-epochs"
                )

    @property
    def trackers(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(name.strip() for name in self.tracker.split(",") if name.strip()))

    @property
    def schedule(self) -> Schedule:
        """The learning-rate schedule of phase 1 (and of P-SGD in phase 3)."""
        return Schedule(
            self.lr_schedule, _fractions(self.lr_milestones) or PAPER_MILESTONES, self.lr_gamma, self.warmup_epochs
        )

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

    The driver is the entrypoint process (``dldr fit``): it checks the run, starts the Ray Train
    run and records it. The workers' share is the config's ``workers`` x ``cpus_per_worker``
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


def flag_type(f: Any) -> Callable[[str], Any]:
    """How the command line's text of field ``f`` becomes its value (``auto`` is None where the default is)."""
    kind = field_type(f)
    if f.metadata.get("shown") != AUTO:
        return kind

    def parse(text: str) -> Any:
        return None if text == AUTO else kind(text)

    parse.__name__ = kind.__name__  # what argparse's error names
    return parse


def shown_default(f: Any) -> str:
    """Field ``f``'s default as ``--help`` and the README's table show it."""
    return str(f.metadata.get("shown", f.default))


def options_table() -> str:
    """The README's table of options, one row per Config field (tests/test_cli.py keeps the README's in step)."""
    rows = ["| option | default | what it sets |", "| --- | --- | --- |"]
    for f in fields(Config):
        choices = f.metadata.get("choices")
        text = f.metadata["help"] + (f" ({' / '.join(choices)})" if choices and f.name != "tracker" else "")
        default = shown_default(f)
        default = f"`{default}`" if default and " " not in default else default
        rows.append(f"| `--{f.name.replace('_', '-')}` | {default} | {text.replace('|', '/')} |")
    return "\n".join(rows) + "\n"


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
        raise DldrError(
            f"--lr-milestones must be increasing fractions of the phase in (0, 1), comma separated "
            f"(e.g. 0.5,0.75 for epochs 50 and 75 of 100), got {text!r}"
        )
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
        if (value is None or value == AUTO == known[key].metadata.get("shown")) and known[key].default is None:
            typed[key] = None
            continue
        if (
            kind is str and key in _LISTS and isinstance(value, list) and all(_is(_LISTS[key], v) for v in value)
        ):  # a YAML list of milestones or trackers
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
