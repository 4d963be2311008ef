"""The three phases of DLDR as plain functions over a run: (config, store, comm, log).

sample: SGD from w_0, writing this rank's slice of w at every snapshot point.
basis:  the top-d principal directions of the trajectory (``dldr.basis``).
train:  w = w_start + P c, with P-BFGS or P-SGD on the d coordinates (``dldr.optim``).
Nothing here knows about Ray: the cross-rank steps go through ``Comm``.
"""
from __future__ import annotations

import time
from collections.abc import Callable
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
from dldr.basis import build_basis
from dldr.comm import Comm, LocalComm
from dldr.config import Config
from dldr.errors import DldrError
from dldr.optim import PBFGS, PSGD
from dldr.params import FlatParams, shard_slices, trainable
from dldr.runlog import RunLog
from dldr.store import RunStore, snapshot_path
from dldr.subspace import Subspace

CONFIG = "config.yaml"
MODEL = "model.safetensors"
EVAL_BATCH = 1024


@dataclass
class Run:
    cfg: Config
    store: RunStore
    comm: Comm = field(default_factory=LocalComm)
    progress: bool = True

    def __post_init__(self) -> None:
        self.device = _device(self.cfg)
        self.log = RunLog(self.store)

    def bar(self, desc: str, total: int) -> tqdm:
        return tqdm(total=total, desc=desc, unit="step", disable=not self.progress, dynamic_ncols=True)


def _device(cfg: Config) -> torch.device:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise DldrError("--device cuda was asked for but torch sees no CUDA GPU; use --device cpu")
    return torch.device(cfg.device)


def start_run(cfg: Config, progress: bool = True) -> Run:
    """Check the device, model and data, then create the run directory with its config.yaml."""
    _device(cfg)
    data = datasets.load(cfg.data, cfg.label_noise, cfg.seed)
    models.create(cfg.model, data.num_classes, data.input_shape)
    store = RunStore(cfg.run_dir)
    if store.exists(CONFIG):
        raise DldrError(f"{cfg.run_dir} already holds a run; pick a new --run-dir, or re-run one phase "
                        "there with `dldr sample`, `dldr basis` or `dldr train`")
    store.write_bytes(CONFIG, cfg.to_yaml().encode())
    return Run(cfg, store, progress=progress)


def holds_run(run_dir: str) -> bool:
    return RunStore(run_dir).exists(CONFIG)


def open_run(run_dir: str, overrides: dict[str, Any], progress: bool = True) -> Run:
    """An existing run, with the flags given for this phase on top of its config.yaml."""
    store = RunStore(run_dir)
    if not store.exists(CONFIG):
        raise DldrError(f"{run_dir} holds no run (no config.yaml); start one with `dldr fit --run-dir {run_dir}`")
    source = f"{run_dir}/{CONFIG}"
    base = Config.from_dict(Config.read_yaml(store.read_bytes(CONFIG).decode(), source), source=source)
    cfg = Config.from_dict({**overrides, "run_dir": run_dir}, base=base, source="command line")
    return Run(cfg, store, progress=progress)


def save_config(run: Run) -> None:
    """Record the configuration a phase re-run used, once it has succeeded."""
    text = run.cfg.to_yaml().encode()
    if run.store.read_bytes(CONFIG) != text:
        run.store.write_bytes(CONFIG, text)


def _model(run: Run, data: datasets.Dataset) -> nn.Module:
    torch.manual_seed(run.cfg.seed)
    return models.create(run.cfg.model, data.num_classes, data.input_shape).to(run.device)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> tuple[float, float]:
    """Mean cross-entropy and accuracy in eval mode."""
    model.eval()
    loss, correct = 0.0, 0
    for start in range(0, len(y), EVAL_BATCH):
        xb, yb = x[start:start + EVAL_BATCH].to(device), y[start:start + EVAL_BATCH].to(device)
        out = model(xb)
        loss += float(F.cross_entropy(out, yb, reduction="sum"))
        correct += int((out.argmax(1) == yb).sum())
    model.train()
    return loss / len(y), correct / len(y)


def _finite(loss: torch.Tensor, phase: str, epoch: int, advice: str) -> float:
    value = float(loss.detach())
    if not np.isfinite(value):
        raise DldrError(f"the {phase} loss became {value} in epoch {epoch}; {advice}")
    return value


def sample(run: Run) -> dict[str, Any]:
    """Phase 1: SGD from w_0, snapshots at the start and every k steps (or every epoch)."""
    cfg, store, comm = run.cfg, run.store, run.comm
    start = time.perf_counter()
    data = datasets.load(cfg.data, cfg.label_noise, cfg.seed)
    model = _model(run, data)
    run.log.begin("sample")
    for stale in ("snapshots/", "basis/", MODEL):
        store.remove(stale)
    if cfg.label_noise > 0:
        store.save_array("data/train_labels.npy", data.train_y.numpy())
    flat = FlatParams(trainable(model))
    shard = shard_slices(flat.numel, comm.world_size)[comm.rank]

    def snapshot(step: int) -> None:
        store.save_array(snapshot_path(comm.rank, comm.world_size, step), flat.get()[shard].cpu().numpy())

    opt = torch.optim.SGD(flat.params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    steps_per_epoch = datasets.num_batches(len(data.train_y), cfg.batch_size)
    step, snapshots = 0, 1
    snapshot(step)
    with run.bar("sample", cfg.sample_epochs * steps_per_epoch) as bar:
        for epoch in range(1, cfg.sample_epochs + 1):
            losses = []
            for xb, yb in datasets.batches(data.train_x, data.train_y, cfg.batch_size, cfg.seed, epoch):
                loss = F.cross_entropy(model(xb.to(run.device)), yb.to(run.device))
                losses.append(_finite(loss, "sampling", epoch, "lower --lr"))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                if cfg.snapshot_every and step % cfg.snapshot_every == 0:
                    snapshot(step)
                    snapshots += 1
                bar.update()
            if not cfg.snapshot_every:
                snapshot(step)
                snapshots += 1
            test_loss, test_acc = evaluate(model, data.test_x, data.test_y, run.device)
            bar.set_postfix(loss=f"{np.mean(losses):.4f}", test_acc=f"{test_acc:.4f}")
            run.log.log("sample", epoch=epoch, step=step, train_loss=float(np.mean(losses)), test_loss=test_loss,
                        test_accuracy=test_acc, lr=cfg.lr, seconds=time.perf_counter() - start)
    result = {"seconds": time.perf_counter() - start, "epochs": cfg.sample_epochs, "snapshots": snapshots,
              "test_accuracy": test_acc}
    store.write_bytes("plots/curves.png", plots.curves(run.log.records))
    run.log.finish("sample", result)
    return result


def basis(run: Run) -> dict[str, Any]:
    """Phase 2: the d-dimensional basis of the trajectory (or a random one), sharded like the snapshots."""
    cfg, store = run.cfg, run.store
    run.log.begin("basis")
    with run.bar("basis", 2 * len(store.snapshot_shards())) as bar:
        report = build_basis(store, cfg.dim, cfg.subspace, cfg.seed, on_pass=bar.update)
    eigvals = store.load_array("basis/eigvals.npy")
    store.write_bytes("plots/explained_variance.png", plots.explained_variance(eigvals, cfg.dim))
    run.log.log("basis", **report.to_dict())
    result = {"seconds": report.seconds, "dim": report.dim,
              "explained_variance_ratio": report.explained_variance_ratio, "subspace": report.kind}
    run.log.finish("basis", result)
    return result


def _concat_shards(store: RunStore, rels: list[str]) -> np.ndarray:
    return np.concatenate([store.load_array(rel) for rel in rels])


def _start_point(store: RunStore, how: str) -> np.ndarray:
    if how == "mean":
        return _concat_shards(store, store.files("basis/mean-shard-"))
    index = 0 if how == "first" else -1
    return _concat_shards(store, [files[index] for files in store.snapshot_shards()])


def _optimizer(cfg: Config, model: nn.Module, subspace: Subspace) -> torch.optim.Optimizer:
    params = trainable(model)
    if cfg.optimizer == "pbfgs":
        return PBFGS(params, subspace, buffers=list(model.buffers()), sigma=cfg.armijo_sigma,
                     beta=cfg.armijo_beta, max_trials=cfg.max_trials)
    return PSGD(params, subspace, lr=cfg.subspace_lr, momentum=cfg.momentum)


def train(run: Run) -> dict[str, Any]:
    """Phase 3: train the d coordinates c of w = w_start + P c."""
    cfg, store, comm = run.cfg, run.store, run.comm
    start = time.perf_counter()
    basis_files = store.files("basis/shard-")
    if not basis_files:
        raise DldrError(f"{cfg.run_dir} has no basis; run `dldr basis --run-dir {cfg.run_dir}` first")
    data = datasets.load(cfg.data, cfg.label_noise, cfg.seed)
    model = _model(run, data)
    flat = FlatParams(trainable(model))
    w_start, basis_rows = _start_point(store, cfg.start), _concat_shards(store, basis_files)
    if basis_rows.shape[0] != flat.numel or w_start.shape[0] != flat.numel:
        raise DldrError(f"the run's snapshots have {basis_rows.shape[0]} parameters but {cfg.model} on {cfg.data} "
                        f"has {flat.numel}; train with the --model and --data the run was sampled with")
    run.log.begin("train")
    flat.set(torch.from_numpy(w_start).to(run.device))
    shard = shard_slices(flat.numel, comm.world_size)[comm.rank]
    subspace = Subspace(torch.from_numpy(np.ascontiguousarray(basis_rows[shard])).to(run.device), shard, comm)
    opt = _optimizer(cfg, model, subspace)
    model.train()
    steps_per_epoch = datasets.num_batches(len(data.train_y), cfg.batch_size)
    with run.bar(f"train ({cfg.optimizer}, d={subspace.dim})", cfg.subspace_epochs * steps_per_epoch) as bar:
        for epoch in range(1, cfg.subspace_epochs + 1):
            losses = []
            for xb, yb in datasets.batches(data.train_x, data.train_y, cfg.batch_size, cfg.seed + 1, epoch):
                losses.append(_finite(_step(opt, model, xb.to(run.device), yb.to(run.device)), "subspace",
                                      epoch, "try --start mean, a smaller --dim or --optimizer pbfgs"))
                bar.update()
            test_loss, test_acc = evaluate(model, data.test_x, data.test_y, run.device)
            stats = _optimizer_stats(opt, epoch * steps_per_epoch)
            bar.set_postfix(loss=f"{np.mean(losses):.4f}", test_acc=f"{test_acc:.4f}")
            run.log.log("train", epoch=epoch, step=epoch * steps_per_epoch, optimizer=cfg.optimizer,
                        train_loss=float(np.mean(losses)), test_loss=test_loss, test_accuracy=test_acc,
                        seconds=time.perf_counter() - start, **stats)
    store.write_bytes(MODEL, safetensors_bytes({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}))
    store.write_bytes("plots/curves.png", plots.curves(run.log.records))
    result = {"seconds": time.perf_counter() - start, "epochs": cfg.subspace_epochs, "test_accuracy": test_acc,
              "line_search_failures": stats.get("line_search_failures", 0), "optimizer": cfg.optimizer}
    run.log.finish("train", result)
    return result


def _step(opt: torch.optim.Optimizer, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    def closure() -> torch.Tensor:
        opt.zero_grad(set_to_none=False)
        loss = F.cross_entropy(model(x), y)
        if torch.is_grad_enabled():
            loss.backward()
        return loss

    try:
        return opt.step(closure)
    except FloatingPointError as e:
        raise DldrError(f"{e}; the subspace start point may be diverged: try --start first or a smaller --lr") from None


def _optimizer_stats(opt: torch.optim.Optimizer, steps: int) -> dict[str, float]:
    state = next(iter(opt.state.values()))
    if "trials" not in state:
        return {}
    return {"line_search_failures": state["line_search_failures"], "mean_trials": state["trials"] / steps,
            "curvature_skips": state["curvature_skips"], "descent_resets": state["descent_resets"]}


PHASE_FUNCTIONS: dict[str, Callable[[Run], dict[str, Any]]] = {"sample": sample, "basis": basis, "train": train}
