"""Phase 2 math: the DLDR basis of a sharded snapshot trajectory, or a random one to compare with.

With W = [w_1 - m, ..., w_t - m] the centred snapshot matrix (D x t), the top-d eigenpairs
(sigma_i^2, v_i) of the t x t Gram W^T W give the top-d left singular vectors of W:
u_i = W v_i / sigma_i. W is never formed: each parameter shard r streams its snapshot files in
row blocks, so a block holds every snapshot of its rows and is centred exactly there (this
avoids the cancellation of centring the raw Gram afterwards), and the Gram is summed in
float64. The shards' t x t Grams are summed, ``eigh`` runs once in float64, and each shard
writes its slice P_r of the basis in a second streamed pass, in float32 (P's own precision).
A background thread reads and checksums the next block while the current one is computed.
Peak memory per shard: a few blocks of rows x t, plus t x t.

The per-shard passes are plain functions ``fn(store, *args)``; ``build_basis`` hands them to a
``ShardMap``, which runs them one after another here or as Ray tasks next to the shards.
"""
from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

import numpy as np

from dldr.errors import DldrError
from dldr.store import RunStore, basis_path, mean_path

BLOCK_BYTES = 64 << 20
ORTHONORMALITY_TOL = 1e-3
# Eigenvalues below this fraction of the largest are rounding, not directions of the trajectory.
RANK_RTOL = 1e-10

T = TypeVar("T")
# (centred block, t x rows float32; shard rank) -> the block's rows of P, rows x d float32
ColumnFn = Callable[[np.ndarray, int], np.ndarray]
# (fn, [args of shard 0, args of shard 1, ...]) -> [fn(store, *args) for each shard], in order
ShardMap = Callable[[Callable[..., Any], list[tuple]], list[Any]]


def sequential(store: RunStore, on_pass: Callable[[], object] = lambda: None) -> ShardMap:
    """Run the per-shard passes one after another in this process."""
    def map_shards(fn: Callable[..., Any], args: list[tuple]) -> list[Any]:
        results = []
        for a in args:
            results.append(fn(store, *a))
            on_pass()
        return results
    return map_shards


@dataclass
class BasisReport:
    kind: str
    dim: int
    num_snapshots: int
    num_params: int
    num_shards: int
    explained_variance_ratio: float
    orthonormality_error: float
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def block_rows(num_snapshots: int, block_bytes: int = BLOCK_BYTES) -> int:
    return max(1, block_bytes // (8 * num_snapshots))


def snapshot_blocks(store: RunStore, rels: list[str], rows: int) -> Iterator[np.ndarray]:
    """Yield t x rows float32 blocks of one shard's snapshots: row i of a block is snapshot i.

    A background thread reads (and checksums) the next block while the caller computes on
    this one. The checksums of all files are verified once the last block has been read.
    """
    readers = []
    try:
        for rel in rels:
            readers.append(store.row_reader(rel))
        length = readers[0].shape
        for reader in readers:
            if reader.shape != length or len(length) != 1:
                raise DldrError(f"{store.abspath(reader.rel)} has shape {reader.shape}, expected {length} "
                                "like the other snapshots of its shard; re-run `dldr sample`")

        def read() -> Iterator[np.ndarray]:
            for start in range(0, length[0], rows):
                block = np.empty((len(readers), min(rows, length[0] - start)), dtype=np.float32)
                for i, reader in enumerate(readers):
                    block[i] = reader.read(block.shape[1])
                yield block
            for reader in readers:
                reader.finish()

        yield from prefetched(read())
    finally:
        for reader in readers:
            reader.close()


def prefetched(items: Iterator[T], depth: int = 2) -> Iterator[T]:
    """``items``, produced on a background thread up to ``depth`` ahead; its errors re-raised here."""
    slots: queue.Queue = queue.Queue(depth)
    stop = threading.Event()
    done = object()

    def offer(entry: tuple[Any, BaseException | None]) -> bool:
        """Queue ``entry`` unless the consumer has stopped listening."""
        while not stop.is_set():
            try:
                slots.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not offer((item, None)):
                    return
            offer((done, None))
        except BaseException as e:  # noqa: BLE001  (handed to the consumer)
            offer((done, e))

    thread = threading.Thread(target=produce, daemon=True, name="dldr-prefetch")
    thread.start()
    try:
        while True:
            item, error = slots.get()
            if error is not None:
                raise error
            if item is done:
                return
            yield item
    finally:
        stop.set()
        thread.join()


def _centred(block: np.ndarray, dtype: type) -> tuple[np.ndarray, np.ndarray]:
    """(row means in float64, the block centred on them in ``dtype``): each column is one parameter."""
    mean = block.mean(axis=0, dtype=np.float64)
    return mean, np.subtract(block, mean.astype(dtype), dtype=dtype)


def shard_gram(store: RunStore, rels: list[str], block_bytes: int = BLOCK_BYTES) -> np.ndarray:
    """The centred Gram W_r^T W_r (t x t) of one shard, centred and summed in float64."""
    t = len(rels)
    gram = np.zeros((t, t))
    for block in snapshot_blocks(store, rels, block_rows(t, block_bytes)):
        centred = _centred(block, np.float64)[1]
        gram += centred @ centred.T
    return gram


def decompose(gram: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (descending, all t) and the top-``dim`` eigenvectors of the centred Gram."""
    t = gram.shape[0]
    if dim < 1:
        raise DldrError(f"--dim must be at least 1, got {dim}")
    if dim >= t:
        raise DldrError(f"--dim {dim} needs at least {dim + 1} snapshots, the run has {t}; sample more "
                        "(more --sample-epochs or a smaller --snapshot-every) or lower --dim")
    eigvals, eigvecs = np.linalg.eigh(gram)
    eigvals, eigvecs = np.clip(eigvals[::-1], 0.0, None), eigvecs[:, ::-1]
    rank = int(np.sum(eigvals > RANK_RTOL * eigvals[0])) if eigvals[0] > 0 else 0
    if rank < dim:
        raise DldrError(f"the {t} snapshots span only {rank} directions, fewer than --dim {dim}; "
                        f"sample a trajectory that moves more (a larger --lr, more snapshots) or use --dim {max(rank, 1)}")
    return eigvals, eigvecs[:, :dim]


def write_shard(store: RunStore, rank: int, num_shards: int, rels: list[str], columns: ColumnFn,
                dim: int, block_bytes: int = BLOCK_BYTES, project: bool = False
                ) -> tuple[np.ndarray, np.ndarray | None]:
    """Stream one shard again, writing its basis slice P_r (D_r x d) and snapshot mean m_r.

    Returns P_r^T P_r (d x d), for the orthonormality check, and with ``project`` P_r^T W_r
    (d x t), for the variance a basis that is not the trajectory's own captures; the caller
    sums them over shards. This pass works in float32, the precision P is stored in.
    """
    t = len(rels)
    length = store.manifest[rels[0]]["shape"][0]
    gram_p, proj = np.zeros((dim, dim)), np.zeros((dim, t)) if project else None
    with store.array_writer(basis_path(rank, num_shards), (length, dim), np.float32) as out_p, \
            store.array_writer(mean_path(rank, num_shards), (length,), np.float32) as out_m:
        for block in snapshot_blocks(store, rels, block_rows(t, block_bytes)):
            mean, centred = _centred(block, np.float32)
            p = columns(centred, rank)
            out_p.write(p)
            out_m.write(mean.astype(np.float32))
            gram_p += p.T @ p
            if proj is not None:
                proj += p.T @ centred.T
    return gram_p, proj


def trajectory_columns(eigvals: np.ndarray, eigvecs: np.ndarray) -> ColumnFn:
    """u_i = W v_i / sigma_i, applied to a centred block (t x rows)."""
    coeffs = (eigvecs / np.sqrt(eigvals[: eigvecs.shape[1]])).astype(np.float32)
    return lambda centred, rank: centred.T @ coeffs


def random_sq_norms(store: RunStore, rank: int, length: int, dim: int, seed: int, block_bytes: int) -> np.ndarray:
    """The squared column norms of shard ``rank``'s Gaussian rows, drawn block by block."""
    rng, rows = np.random.default_rng([seed, rank]), block_rows(dim, block_bytes)
    sq_norms = np.zeros(dim)
    for start in range(0, length, rows):
        sq_norms += np.sum(rng.standard_normal((min(rows, length - start), dim)) ** 2, axis=0)
    return sq_norms


def random_columns(sq_norms: np.ndarray, dim: int, seed: int) -> ColumnFn:
    """Gaussian columns with unit norm over all shards (Li et al. 2018).

    Each shard draws from its own seeded stream in row order: once in ``random_sq_norms``, to
    sum the squared column norms across shards, and again here, to emit the normalised rows.
    """
    scale = 1.0 / np.sqrt(sq_norms)
    streams: dict[int, np.random.Generator] = {}

    def columns(centred: np.ndarray, rank: int) -> np.ndarray:
        rng = streams.setdefault(rank, np.random.default_rng([seed, rank]))
        return (rng.standard_normal((centred.shape[1], dim)) * scale).astype(np.float32)

    return columns


def build_basis(store: RunStore, dim: int, kind: str = "trajectory", seed: int = 0,
                block_bytes: int = BLOCK_BYTES, map_shards: ShardMap | None = None) -> BasisReport:
    """Phase 2: sum the shards' Grams, decompose, and have every shard write its basis slice.

    This process only holds t x t and d x t matrices; ``map_shards`` (default: ``sequential``)
    runs the streamed passes over each shard.
    """
    start = time.perf_counter()
    map_shards = map_shards or sequential(store)
    if kind not in ("trajectory", "random"):
        raise DldrError(f"unknown subspace {kind!r}; use trajectory or random")
    shards = store.snapshot_shards()
    t = len(shards[0])
    gram = np.sum(map_shards(shard_gram, [(rels, block_bytes) for rels in shards]), axis=0)
    eigvals, eigvecs = decompose(gram, dim)
    lengths = [store.manifest[rels[0]]["shape"][0] for rels in shards]
    if kind == "trajectory":
        columns = trajectory_columns(eigvals, eigvecs)
    else:
        sq_norms = map_shards(random_sq_norms, [(r, n, dim, seed, block_bytes) for r, n in enumerate(lengths)])
        columns = random_columns(np.sum(sq_norms, axis=0), dim, seed)
    parts = map_shards(write_shard, [(rank, len(shards), rels, columns, dim, block_bytes, kind == "random")
                                     for rank, rels in enumerate(shards)])
    gram_p = np.sum([p[0] for p in parts], axis=0)
    if kind == "trajectory":  # span(P) is the top-d eigenspace: its share of the variance
        explained = float(eigvals[:dim].sum() / eigvals.sum())
    else:
        explained = captured_variance(gram_p, np.sum([p[1] for p in parts], axis=0), eigvals)
    store.save_array("basis/gram.npy", gram)
    store.save_array("basis/eigvals.npy", eigvals)
    report = BasisReport(
        kind=kind, dim=dim, num_snapshots=t, num_params=sum(lengths), num_shards=len(shards),
        explained_variance_ratio=explained,
        orthonormality_error=float(np.abs(gram_p - np.eye(dim)).max()),
        seconds=time.perf_counter() - start,
    )
    if kind == "trajectory" and report.orthonormality_error > ORTHONORMALITY_TOL:
        raise DldrError(f"the basis is not orthonormal (max |P^T P - I| = {report.orthonormality_error:.2e}): "
                        "the trajectory is nearly degenerate; lower --dim or sample longer")
    store.write_json("basis/report.json", report.to_dict())
    return report


def captured_variance(gram_p: np.ndarray, proj: np.ndarray, eigvals: np.ndarray) -> float:
    """Fraction of the trajectory's variance inside span(P): tr(W^T P (P^T P)^-1 P^T W) / tr(W^T W)."""
    return float(np.trace(proj.T @ np.linalg.solve(gram_p, proj)) / eigvals.sum())
