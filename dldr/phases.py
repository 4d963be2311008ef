"""The three phases of DLDR as plain functions over a run: (config, store, comm, log).

sample: SGD from w_0, writing this rank's slice of w at every snapshot point.
basis:  the top-d principal directions of the trajectory (``dldr.basis``).
train:  w = w_start + P c, with P-BFGS or P-SGD on the d coordinates (``dldr.optim``).
Nothing here knows about Ray: the cross-rank steps go through ``Comm``.
"""

from __future__ import annotations

import io
import json
import pickle
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save as safetensors_bytes
from torch import nn
from tqdm.auto import tqdm

from dldr import data as datasets
from dldr import models, plots
from dldr.basis import (
    BASIS_DTYPES,
    SHARDS,
    basis_report,
    basis_shard,
    basis_tensor,
    build_basis,
    check_dim,
    shard_map,
    shard_path,
    snapshot_rows,
)
from dldr.comm import Comm, LocalComm
from dldr.config import Config
from dldr.errors import DldrError
from dldr.memory import Peak
from dldr.optim import PBFGS, PSGD
from dldr.params import FlatParams, shard_slices, trainable
from dldr.runlog import PHASES, RunLog
from dldr.store import CONFIG, BackgroundWriter, RunStore, snapshot_path
from dldr.subspace import Subspace
from dldr.tracking import Tracking

MODEL = "model.safetensors"
SUBSPACE_STATE = "subspace/state.pt"
STATE_KEYS = ("model", "optimizer", "epoch", "fingerprint", "scheduler")
# The keys whose change makes a stopped phase 3 start over instead of resuming.
TRAIN_KEYS = (
    "model",
    "data",
    "image_size",
    "seed",
    "batch_size",
    "subspace_batch_size",
    "label_noise",
    "holdout",
    "start",
    "optimizer",
    "basis_dtype",
    "subspace_lr",
    "momentum",
    "armijo_sigma",
    "armijo_beta",
    "armijo_backtrack",
    "max_trials",
)
# ... and for P-SGD, whose learning-rate schedule spans the phase's epochs
PSGD_KEYS = ("subspace_epochs", "lr_schedule", "lr_milestones", "lr_gamma", "warmup_epochs")


class Session:
    """What a phase asks of the machinery that runs it. This one runs everything in-process.

    The Ray engine supplies a subclass on each worker: rank 0 prints its progress once an
    epoch, ``report`` goes to ``ray.train.report`` with a checkpoint, and ``restore`` returns
    the checkpoint a restarted worker group resumes from.
    """

    def bar(self, desc: str, total: int, enabled: bool) -> Any:
        return tqdm(total=total, desc=desc, unit="step", disable=not enabled, dynamic_ncols=True)

    def restore(self) -> dict[str, Any] | None:
        """The state the last ``report`` of this phase saved, when the phase is being resumed."""
        return None

    def report(self, metrics: dict[str, Any], state: dict[str, Any] | None = None) -> None:
        """Called by every rank once per epoch; ``state["shared"]`` is the same on every rank."""

    def after_step(self, step: int) -> None:
        """Called by every rank after every optimizer step of phases 1 and 3."""

    def node(self) -> str | None:
        """The cluster node this rank runs on, which every epoch's record lists per rank; None in-process."""
        return None


@dataclass
class Run:
    cfg: Config
    store: RunStore
    comm: Comm = field(default_factory=LocalComm)
    progress: bool = True
    device: torch.device | None = None
    session: Session = field(default_factory=Session)
    tracking: Tracking = field(default_factory=Tracking)

    def __post_init__(self) -> None:
        self.device = self.device or _device(self.cfg)
        self.log = RunLog(self.store, self.tracking)

    @property
    def main(self) -> bool:
        """Rank 0 owns the manifest, the log and the files every rank holds a copy of."""
        return self.comm.rank == 0

    def bar(self, desc: str, total: int) -> Any:
        return self.session.bar(desc, total, self.progress and self.main)

    def barrier(self) -> None:
        self.comm.all_gather_object(None)

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        """A batch on the run's device, image batches channels-last like the model (see ``build_model``)."""
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if x.ndim == 4 else x

    def autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.precision == "bf16")


def load_data(cfg: Config) -> datasets.DataSource:
    return datasets.load(cfg.data, cfg.label_noise, cfg.seed, cfg.image_size, cfg.loader_workers, cfg.holdout)


def _device(cfg: Config) -> torch.device:
    """The device of an in-process run. With Ray workers, each worker gets its own from Ray."""
    if cfg.workers:
        return torch.device("cpu")  # the driver runs no phase: each worker gets its device from Ray
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise DldrError(
            "--device cuda was asked for but torch sees no CUDA GPU; use --device cpu, "
            "or --workers N to train on the GPUs of a Ray cluster"
        )
    return torch.device(cfg.device)


def check_sampling(cfg: Config, names: Sequence[str] = PHASES) -> None:
    """What a phase 1 (and the phases after it, ``names``) needs, checked before any file is written:
    the device, the data set, the model on it, and enough snapshots for ``--dim``."""
    _device(cfg)
    data = load_data(cfg)
    models.check_input(models.create(cfg.model, data.num_classes, data.input_shape), cfg.model, data.input_shape)
    if "basis" in names:
        check_dim(cfg.dim, cfg.snapshot_count(data.steps(cfg.batch_size, max(cfg.workers, 1))))


def start_run(cfg: Config, progress: bool = True, checked: bool = False) -> Run:
    """Create the run directory with its config.yaml, after ``check_sampling`` of phase 1 unless ``checked``.

    The caller of a command holds the run directory's lock (``RunStore.lock``), so that two
    commands cannot both find the directory empty and both start a run there.
    """
    if not checked:
        check_sampling(cfg, ["sample"])
    store = RunStore(cfg.run_dir)
    refuse_existing(store)
    store.write_bytes(CONFIG, cfg.to_yaml().encode())
    return Run(cfg, store, progress=progress)


def refuse_existing(store: RunStore) -> None:
    """A new run never goes where one is."""
    if store.exists(CONFIG):
        raise DldrError(
            f"{store.url} already holds a run; pick a new --run-dir, or re-run one phase "
            "there with `dldr sample`, `dldr basis` or `dldr train`"
        )


def open_run(run_dir: str, overrides: dict[str, Any], progress: bool = True) -> Run:
    """An existing run, with the flags given for this phase on top of its config.yaml."""
    store = RunStore(run_dir)
    if not store.exists(CONFIG):
        raise DldrError(f"{run_dir} holds no run (no config.yaml); start one with `dldr fit --run-dir {run_dir}`")
    source = f"{run_dir}/{CONFIG}"
    try:
        text = store.read_bytes(CONFIG).decode()
    except UnicodeDecodeError as e:
        raise DldrError(
            f"{source} is not UTF-8 text ({e.reason} at byte {e.start}); restore it from a copy, "
            "or start a new run with `dldr fit`"
        ) from None
    base = Config.from_dict(Config.read_yaml(text, source), source=source)
    cfg = Config.from_dict({**overrides, "run_dir": run_dir}, base=base, source="command line")
    return Run(cfg, store, progress=progress)


def check_phases(run: Run, names: Sequence[str]) -> None:
    """Refuse, before any file is written, phases the run directory cannot feed: a basis of a phase 1
    that did not finish, a phase 3 without a finished phase 2, a ``--dim`` the snapshots cannot give."""
    cfg, store, first = run.cfg, run.store, names[0]
    if first == "sample":
        check_sampling(cfg, names)
        return
    run.log.check()
    needed = PHASES[PHASES.index(first) - 1]
    if needed not in run.log.summary["phases"]:
        how = {
            "sample": f"`dldr sample --run-dir {store.url}` (with --workers N and --max-failures K, a phase "
            "resumes from its checkpoints when workers fail)",
            "basis": f"`dldr basis --run-dir {store.url}`",
        }[needed]
        raise DldrError(
            f"{store.url} holds no finished phase {needed}: it was stopped, failed or never ran; run {how} first"
        )
    if first == "basis":
        check_dim(cfg.dim, len(store.snapshot_shards()[0]))
    else:
        basis_report(store)


def save_config(run: Run) -> None:
    """Record the configuration a phase re-run used, once it has succeeded."""
    text = run.cfg.to_yaml().encode()
    if run.store.read_bytes(CONFIG) != text:
        run.store.write_bytes(CONFIG, text)


def build_model(run: Run, data: datasets.DataSource) -> nn.Module:
    """The model, channels-last: cuDNN's and oneDNN's (CPU) convolutions run faster so, forwards
    most of all (see benchmarks/README.md, step). A memory layout only: w's order is unchanged."""
    torch.manual_seed(run.cfg.seed)
    model = models.create(run.cfg.model, data.num_classes, data.input_shape).to(run.device)
    return model.to(memory_format=torch.channels_last)


@torch.no_grad()
def evaluate(run: Run, model: nn.Module, data: datasets.DataSource, split: str = "test") -> tuple[float, float]:
    """Mean cross-entropy and accuracy on the test (or val) set in eval mode; each rank evaluates its share."""
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=run.device)  # summed on the device: no sync per batch
    batches = data.test_batches if split == "test" else data.val_batches
    for xb, yb in batches(run.cfg.batch_size, run.comm.rank, run.comm.world_size):
        yb = yb.to(run.device)
        with run.autocast():
            out = model(run.inputs(xb))
        totals[0] += F.cross_entropy(out.float(), yb, reduction="sum")
        totals[1] += (out.argmax(1) == yb).sum()
        totals[2] += len(yb)
    model.train()
    loss, correct, count = run.comm.all_reduce_sum(totals.cpu()).tolist()
    return loss / count, correct / count


def _finite(loss: torch.Tensor, phase: str, epoch: int, advice: str) -> float:
    value = float(loss.detach())
    if not np.isfinite(value):
        raise DldrError(f"the {phase} loss became {value} in epoch {epoch}; {advice}")
    return value


def sample(run: Run) -> dict[str, Any]:
    """Phase 1: SGD from w_0, each rank writing its slice of w at the start and every k steps.

    Snapshot files are written in the background and entered in the manifest at the end of
    each epoch, together with the checkpoint a restarted worker group resumes from: a resumed
    run writes the snapshots after that checkpoint again, under the same names.
    """
    cfg, store, comm = run.cfg, run.store, run.comm
    start, peak = time.perf_counter(), Peak(run.device)
    data = load_data(cfg)
    model = build_model(run, data)
    net = comm.data_parallel(model)
    flat = FlatParams(trainable(model))
    shard = shard_slices(flat.numel, comm.world_size)[comm.rank]
    opt = torch.optim.SGD(flat.params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    steps_per_epoch = data.steps(cfg.batch_size, comm.world_size)
    scheduler = cfg.schedule.build(opt, steps_per_epoch, cfg.sample_epochs)
    every = cfg.snapshot_interval(steps_per_epoch)
    resumed = run.session.restore()
    if resumed is None:
        first_epoch, step, snapshots = 1, 0, 1
        if run.main:
            run.log.begin("sample")
            for stale in ("snapshots/", "basis/", "subspace/", MODEL):
                store.remove(stale)
            if cfg.label_noise > 0:
                store.save_array("data/train_labels.npy", data.train_labels.numpy())
    else:
        shared = resumed["shared"]
        model.load_state_dict(shared["model"])
        opt.load_state_dict(shared["optimizer"])
        scheduler.load_state_dict(shared["scheduler"])
        _set_rng(resumed["rank"], run.device)
        first_epoch, step, snapshots = shared["epoch"] + 1, shared["step"], shared["snapshots"]
        if run.main:
            run.log.begin("sample", resume_after_epoch=shared["epoch"])
            store.remove_files(set(store.files("snapshots/")) - set(shared["snapshot_files"]))
    run.barrier()  # no rank writes a snapshot before rank 0 has removed the stale ones

    with BackgroundWriter(store) as writer, run.bar("sample", cfg.sample_epochs * steps_per_epoch) as bar:

        def snapshot() -> None:
            writer.submit(snapshot_path(comm.rank, comm.world_size, step), flat.get(shard).cpu().numpy())

        if resumed is None:
            snapshot()
        bar.update((first_epoch - 1) * steps_per_epoch)
        for epoch in range(first_epoch, cfg.sample_epochs + 1):
            losses = []
            for xb, yb in data.train_batches(cfg.batch_size, cfg.seed, epoch, comm.rank, comm.world_size):
                with run.autocast():
                    loss = F.cross_entropy(net(run.inputs(xb)), yb.to(run.device))
                losses.append(_finite(loss, "sampling", epoch, "lower --lr or add --warmup-epochs"))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                lr = scheduler.get_last_lr()[0]  # this step's
                opt.step()
                scheduler.step()
                step += 1
                if every and step % every == 0:
                    snapshot()
                    snapshots += 1
                run.session.after_step(step)
                bar.update()
            if not every:
                snapshot()
                snapshots += 1
            writer.flush()
            _commit(run)
            metrics = _epoch_metrics(
                run, model, data, losses, epoch=epoch, step=step, lr=lr, seconds=time.perf_counter() - start
            )
            bar.set_postfix(loss=f"{metrics['train_loss']:.4f}", test_acc=f"{metrics['test_accuracy']:.4f}")
            run.log.log("sample", **metrics)
            run.session.report(
                metrics,
                state={
                    "shared": {
                        "model": model.state_dict(),
                        "optimizer": opt.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "epoch": epoch,
                        "step": step,
                        "snapshots": snapshots,
                        "snapshot_files": store.files("snapshots/"),
                    },
                    "rank": _rng(run.device),
                },
            )
    result = {
        "seconds": time.perf_counter() - start,
        "epochs": cfg.sample_epochs,
        "snapshots": snapshots,
        "snapshot_every": every,
        "test_accuracy": run.log.records[-1]["test_accuracy"],
        "workers": comm.world_size,
        "memory": comm.all_gather_object(peak.figures(snapshot_bytes=writer.peak_bytes)),
    }
    if run.main:
        store.write_bytes("plots/curves.png", plots.curves(run.log.records))
    run.log.finish("sample", result)
    return result


def _rng(device: torch.device) -> dict[str, torch.Tensor]:
    """This rank's random state (dropout, augmentation), for an exact resume."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _commit(run: Run) -> None:
    """Enter every rank's files of this epoch in the manifest (rank 0 owns it)."""
    journals = run.comm.all_gather_object(run.store.take_journal())
    if run.main:
        run.store.record({rel: entry for journal in journals for rel, entry in journal.items()})


def _epoch_metrics(
    run: Run, model: nn.Module, data: datasets.DataSource, losses: list[float], **values: Any
) -> dict[str, Any]:
    """The epoch's training loss averaged over ranks, and the test (and validation) metrics."""
    mean = run.comm.all_reduce_sum(torch.tensor([float(np.mean(losses))], dtype=torch.float64))
    metrics = {**values, "train_loss": float(mean[0]) / run.comm.world_size}
    for split in ("val", "test") if run.cfg.holdout else ("test",):
        metrics[f"{split}_loss"], metrics[f"{split}_accuracy"] = evaluate(run, model, data, split)
    node = run.session.node()
    if node is not None:  # where each rank ran: a worker group restarted after a node loss moves
        metrics["nodes"] = run.comm.all_gather_object(node)
    return metrics


def basis(run: Run) -> dict[str, Any]:
    """Phase 2: the d-dimensional basis of the trajectory (or a random one), from one read of the snapshots;
    with several ranks, each reads its own shards (``dldr.basis.shard_map``) and rank 0 writes the basis."""
    cfg, store = run.cfg, run.store

    def replacing() -> None:  # from here on, a stop leaves neither the old basis nor its phase 3 claimed done
        run.log.begin("basis")
        for stale in ("subspace/", MODEL):  # phase 3's state and model of the old basis
            store.remove(stale)

    shards = len(store.snapshot_shards())
    with run.bar("basis", -(-shards // run.comm.world_size)) as bar:  # the passes of this rank's shards
        report = build_basis(
            store,
            cfg.dim,
            cfg.subspace,
            cfg.seed,
            map_shards=shard_map(store, run.comm, bar.update),
            before_write=replacing,
            write=run.main,
        )
        bar.set_postfix(explained_variance=f"{report.explained_variance_ratio:.4f}")
    if run.main:
        eigvals = store.load_array("basis/eigvals.npy")
        store.write_bytes("plots/explained_variance.png", plots.explained_variance(eigvals, cfg.dim))
    run.log.log("basis", **report.to_dict())
    result = {
        "seconds": report.seconds,
        "dim": report.dim,
        "explained_variance_ratio": report.explained_variance_ratio,
        "subspace": report.kind,
        "memory": report.memory,
    }
    run.log.finish("basis", result)
    return result


@torch.no_grad()
def recompute_batchnorm(run: Run, model: nn.Module, data: datasets.DataSource) -> None:
    """Set BatchNorm running statistics to those of the current weights, over one pass of the training data.

    The statistics are buffers, not part of w, so a model set to w_start carries its freshly
    initialised ones, and a few large subspace steps leave them behind the weights. Phase 3
    recomputes them at its start and before its final evaluation, as SWA does; each rank
    averages its share of the data, then the ranks average theirs.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the pass
    was_training = model.training
    model.train()
    cfg, comm = run.cfg, run.comm
    for xb, _ in data.train_batches(
        cfg.train_batch_size(len(data.train_labels)), cfg.seed + 2, 1, comm.rank, comm.world_size
    ):
        with run.autocast():
            model(run.inputs(xb))
    model.train(was_training)
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
        for buffer in (m.running_mean, m.running_var):
            buffer.copy_(comm.all_reduce_sum(buffer) / comm.world_size)


def make_optimizer(cfg: Config, model: nn.Module, subspace: Subspace) -> torch.optim.Optimizer:
    """The phase 3 optimizer ``cfg`` names, over ``model``'s parameters in ``subspace``."""
    params = trainable(model)
    if cfg.optimizer == "pbfgs":
        return PBFGS(
            params,
            subspace,
            buffers=list(model.buffers()),
            sigma=cfg.armijo_sigma,
            beta=cfg.armijo_beta,
            max_trials=cfg.max_trials,
            interpolate=cfg.armijo_backtrack == "interpolate",
        )
    return PSGD(params, subspace, lr=cfg.subspace_lr, momentum=cfg.momentum)


def _fingerprint(cfg: Config, store: RunStore) -> str:
    """What phase 3 depends on; a saved state resumes only under the same fingerprint."""
    keys = {k: getattr(cfg, k) for k in TRAIN_KEYS + (PSGD_KEYS if cfg.optimizer == "psgd" else ())}
    keys["basis"] = [
        store.checksum(rel)
        for rel in store.files("basis/")  # phase 2's files
        if not rel.startswith(SHARDS)
    ]
    return json.dumps(keys, sort_keys=True)


def _saved_state(run: Run, fingerprint: str) -> dict[str, Any] | None:
    """subspace/state.pt of a phase 3 that stopped before its end, if it fits this run."""
    if "train" in run.log.summary["phases"] or not run.store.exists(SUBSPACE_STATE):
        return None
    try:
        state = torch.load(io.BytesIO(run.store.read_bytes(SUBSPACE_STATE)), weights_only=True)
        missing = [k for k in STATE_KEYS if k not in state] if isinstance(state, dict) else list(STATE_KEYS)
        problem = f"no {', '.join(missing)}" if missing else None
        if not (problem or isinstance(state["epoch"], int)):
            problem = f"its epoch is {state['epoch']!r}"
    except (RuntimeError, pickle.UnpicklingError, TypeError, ValueError, EOFError) as e:
        problem = (str(e).strip().splitlines() or [type(e).__name__])[0]
    if problem:
        raise DldrError(
            f"{run.store.abspath(SUBSPACE_STATE)} is not a saved phase 3 state ({problem}); re-run "
            f"`dldr basis --run-dir {run.store.url}` to drop it, then `dldr train`"
        )
    # resumed only under the same fingerprint, and only if epochs are left to run
    return state if state["fingerprint"] == fingerprint and state["epoch"] < run.cfg.subspace_epochs else None


def load_subspace(run: Run, model: nn.Module, held: dict[str, int] | None = None) -> Subspace:
    """The run's subspace for this rank (its rows P_r of the basis in ``--basis-dtype``, formed from its
    snapshot rows and kept in basis/), with ``model`` set to w_start. ``held`` counts the snapshot
    blocks' bytes."""
    cfg, store, comm = run.cfg, run.store, run.comm
    flat = FlatParams(trainable(model))
    stored = basis_report(store)["num_params"]
    if stored != flat.numel:
        raise DldrError(
            f"the run's snapshots have {stored} parameters but {cfg.model} on {cfg.data} "
            f"has {flat.numel}; train with the --model and --data the run was sampled with"
        )
    shard = shard_slices(flat.numel, comm.world_size)[comm.rank]
    rows, mean = basis_shard(store, shard, comm.rank, comm.world_size, BASIS_DTYPES[cfg.basis_dtype], held)
    _commit(run)
    if run.main:  # P's shards from a phase 3 with another number of workers
        store.remove_files(set(store.files(SHARDS)) - {shard_path(r, comm.world_size) for r in range(comm.world_size)})
    # this rank's rows of w_start
    start = mean if cfg.start == "mean" else snapshot_rows(store, 0 if cfg.start == "first" else -1, shard)
    flat.set(comm.all_gather_cat(torch.from_numpy(start).to(run.device)))
    return Subspace(basis_tensor(rows).to(run.device), shard, comm)


def train(run: Run) -> dict[str, Any]:
    """Phase 3: train the d coordinates c of w = w_start + P c; rank r holds only P_r.

    The optimizer state is saved to subspace/state.pt after every epoch, and a phase 3 that
    stopped (a killed run, a failed worker group) resumes from it.
    """
    cfg, store, comm = run.cfg, run.store, run.comm
    start, peak, held = time.perf_counter(), Peak(run.device), {"snapshot_bytes": 0}
    data = load_data(cfg)
    model = build_model(run, data)
    subspace = load_subspace(run, model, held)
    opt = make_optimizer(cfg, model, subspace)
    batch_size = cfg.train_batch_size(len(data.train_labels))
    steps_per_epoch = data.steps(batch_size, comm.world_size)
    # P-SGD follows the run's learning-rate schedule over phase 3; P-BFGS's line search sets its own steps
    scheduler = cfg.schedule.build(opt, steps_per_epoch, cfg.subspace_epochs) if cfg.optimizer == "psgd" else None
    fingerprint = _fingerprint(cfg, store)
    saved = _saved_state(run, fingerprint)
    first_epoch = 1
    if saved is not None:
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(saved["scheduler"])
        first_epoch = saved["epoch"] + 1
    else:
        recompute_batchnorm(run, model, data)
    if run.main:
        run.log.begin("train", resume_after_epoch=first_epoch - 1)
        if saved is None:
            store.remove("subspace/")
    run.barrier()
    net = comm.data_parallel(model)
    model.train()
    stats = _optimizer_stats(opt, max(first_epoch - 1, 1) * steps_per_epoch)
    with run.bar(f"train ({cfg.optimizer}, d={subspace.dim})", cfg.subspace_epochs * steps_per_epoch) as bar:
        bar.update((first_epoch - 1) * steps_per_epoch)
        for epoch in range(first_epoch, cfg.subspace_epochs + 1):
            losses = []
            for step, (xb, yb) in enumerate(
                data.train_batches(batch_size, cfg.seed + 1, epoch, comm.rank, comm.world_size),
                start=(epoch - 1) * steps_per_epoch + 1,
            ):
                losses.append(
                    _finite(
                        _step(run, opt, net, xb, yb),
                        "subspace",
                        epoch,
                        "try --start mean, a smaller --dim or --optimizer pbfgs",
                    )
                )
                if scheduler is not None:
                    scheduler.step()
                run.session.after_step(step)
                bar.update()
            if epoch == cfg.subspace_epochs:
                recompute_batchnorm(run, model, data)
            stats = _optimizer_stats(opt, epoch * steps_per_epoch)
            metrics = _epoch_metrics(
                run,
                model,
                data,
                losses,
                epoch=epoch,
                step=epoch * steps_per_epoch,
                optimizer=cfg.optimizer,
                seconds=time.perf_counter() - start,
                **stats,
            )
            bar.set_postfix(loss=f"{metrics['train_loss']:.4f}", test_acc=f"{metrics['test_accuracy']:.4f}")
            run.log.log("train", **metrics)
            if run.main:
                buffer = io.BytesIO()
                torch.save(
                    {
                        "model": model.state_dict(),
                        "optimizer": opt.state_dict(),
                        "epoch": epoch,
                        "fingerprint": fingerprint,
                        "scheduler": scheduler.state_dict() if scheduler is not None else None,
                    },
                    buffer,
                )
                store.write_bytes(SUBSPACE_STATE, buffer.getvalue())
            run.session.report(metrics)
    test_acc = run.log.records[-1]["test_accuracy"]
    if run.main:
        store.write_bytes(
            MODEL, safetensors_bytes({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()})
        )
        store.write_bytes("plots/curves.png", plots.curves(run.log.records))
    result = {
        "seconds": time.perf_counter() - start,
        "epochs": cfg.subspace_epochs,
        "test_accuracy": test_acc,
        "line_search_failures": stats.get("line_search_failures", 0),
        "optimizer": cfg.optimizer,
        "workers": comm.world_size,
        "resumed_after_epoch": first_epoch - 1,
        "basis_dtype": cfg.basis_dtype,
        "memory": comm.all_gather_object(
            peak.figures(
                basis_rows=subspace.basis.shape[0],
                basis_bytes=subspace.basis.element_size() * subspace.basis.numel(),
                **held,
            )
        ),
    }
    run.log.finish("train", result)
    return result


def closure(
    run: Run, opt: torch.optim.Optimizer, model: nn.Module, x: torch.Tensor, y: torch.Tensor
) -> Callable[[], torch.Tensor]:
    """The batch loss, with its gradient when gradients are enabled: what ``opt.step`` calls."""
    x, y = run.inputs(x), y.to(run.device)

    def loss() -> torch.Tensor:
        training = torch.is_grad_enabled()  # else a line-search trial, which needs the loss only
        if training:
            opt.zero_grad(set_to_none=False)
        with run.autocast():
            value = F.cross_entropy(model(x), y)
        if training:
            value.backward()
        return value

    return loss


def _step(run: Run, opt: torch.optim.Optimizer, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    try:
        return opt.step(closure(run, opt, model, x, y))
    except FloatingPointError as e:
        raise DldrError(f"{e}; the subspace start point may be diverged: try --start first or a smaller --lr") from None


def _optimizer_stats(opt: torch.optim.Optimizer, steps: int) -> dict[str, float]:
    state = next(iter(opt.state.values()), {})
    if "trials" not in state:
        return {}
    return {
        "line_search_failures": state["line_search_failures"],
        "mean_trials": state["trials"] / steps,
        "curvature_skips": state["curvature_skips"],
        "descent_resets": state["descent_resets"],
    }


PHASE_FUNCTIONS: dict[str, Callable[[Run], dict[str, Any]]] = {"sample": sample, "basis": basis, "train": train}
