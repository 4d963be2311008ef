"""Phase 2 math: the DLDR basis of a sharded snapshot trajectory, or a random one to compare with.

With W = [w_1 - m, ..., w_t - m] the centred snapshot matrix (D x t), the top-d eigenpairs
(sigma_i^2, v_i) of the t x t Gram W^T W give the top-d left singular vectors of W:
u_i = W v_i / sigma_i. W is never formed, and phase 2 reads each snapshot file once: each
parameter shard r streams its files in row blocks (a block holds every snapshot of its rows),
subtracts each row's first snapshot (exactly, in float64), and sums the Gram of that in float64.
Shifting a row by a constant leaves J G J unchanged (J = I - 11^T/t centres, J 1 = 0), so the
driver sums the shards' Grams, centres them and runs ``eigh`` once in float64, without the
cancellation of centring a Gram of the raw weights.

What phase 2 stores is C = V_d diag(1/sigma) (t x d), not P: P = W C holds d/t of the snapshots'
bytes, so writing it and reading it back would cost more than the Gram pass itself. Phase 3's
rank r forms its own rows P_r = (W_r - m_r 1^T) C from its snapshot slice as it starts
(``basis_rows``), in float32 or, with ``--basis-dtype bf16``, rounded to bfloat16 block by block (so
no float32 copy of P is ever whole), and keeps them as basis/shard-RRRRR-of-NNNNN.npy (``basis_shard``;
bfloat16 as its uint16 bit patterns, since numpy has no bfloat16), so after phase 3 the run
directory holds P itself, sharded. A random basis is
seeded Gaussian rows drawn in fixed global row blocks, so any rank can draw its own rows; phase 2
draws them along the same pass, for their column norms and the variance they capture.

A background thread reads the next block, several files at a time, while the current one is
computed on as many threads as the process has CPUs (``compute_pool``), and as many more checksum
what was read. Peak memory per shard: four blocks of t x rows, reused from block to block, plus t x t.

The per-shard passes are plain functions ``fn(store, *args)``; ``build_basis`` hands them to a
``ShardMap`` (``shard_map``), which runs them one after another in this process, or spreads them
over the ranks of a process group, each reading its own shards.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import itertools
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

import numba
import numpy as np
import torch
from threadpoolctl import threadpool_limits

from dldr.comm import Comm, LocalComm
from dldr.errors import DldrError
from dldr.memory import Peak
from dldr.store import RowReader, RunStore, paged_buffer, paged_rows, shard_name

BLOCK_BYTES = 64 << 20  # a block of float32 snapshot rows: 1.1 MB of each file at t = 60
RANDOM_BLOCK_ROWS = 1 << 14
# Rows per float64 Gram product: a chunk stays in cache from the subtraction to the product. (float32
# products are twice as fast but lose a real trajectory's trailing directions: their eigenvalues
# lie 1e-6 and more below the largest.)
GRAM_CHUNK_ROWS = 1 << 11
GRAM_TILE = 4  # snapshots per side of a ``chunk_gram`` tile: its 16 sums stay in registers
# The kernels' argument types, so that numba compiles them (or loads them from its cache) when this
# module is imported: its first compile or load in a process takes 0.35 to 0.8 s, which in phase 2
# would leave the reads waiting on full buffers.
_BLOCK = numba.types.Array(numba.float32, 2, "A", readonly=True)  # as ``snapshot_blocks`` yields them
_MATRIX = numba.float64[:, ::1]
# Reads of a block's rows in flight at once: storage serves many requests faster than a few (16 read
# 5.7 GB in 3.0 s here, 4 in 3.4 s, one file after another in 64 MB requests in 2.8 s).
IO_THREADS = 16
COEFFICIENTS, SCALE, REPORT = "basis/coefficients.npy", "basis/scale.npy", "basis/report.json"
SHARDS = "basis/shard-"  # the rows of P that phase 3 keeps, one file per rank
ORTHONORMALITY_TOL = 1e-3
# Eigenvalues below this fraction of the largest are rounding, not directions of the trajectory.
RANK_RTOL = 1e-10

# P's row types by --basis-dtype; numpy has no bfloat16, so bf16 rows are its bit patterns (torch views them as one)
BF16 = np.dtype(np.uint16)
BASIS_DTYPES = {"fp32": np.dtype(np.float32), "bf16": BF16}

T = TypeVar("T")
# (fn, [args of shard 0, args of shard 1, ...]) -> [fn(store, *args) for each shard], in order
ShardMap = Callable[[Callable[..., Any], list[tuple]], list[Any]]


def shard_map(store: RunStore, comm: Comm | None = None, on_pass: Callable[[], object] = lambda: None) -> ShardMap:
    """Run the per-shard passes over the ranks of ``comm`` (default: this process alone): rank r runs
    those of shards r, r + N, ..., and every rank gets every result, in shard order, so the sums
    do not depend on the number of ranks."""
    comm = comm or LocalComm()

    def map_shards(fn: Callable[..., Any], args: list[tuple]) -> list[Any]:
        mine = {}
        for index in range(comm.rank, len(args), comm.world_size):
            mine[index] = fn(store, *args[index])
            on_pass()
        results = {index: value for part in comm.all_gather_object(mine) for index, value in part.items()}
        return [results[index] for index in range(len(args))]

    return map_shards


@dataclass
class BasisReport:
    kind: str
    dim: int
    seed: int
    num_snapshots: int
    num_params: int
    num_shards: int
    explained_variance_ratio: float
    orthonormality_error: float
    seconds: float
    memory: list[dict[str, Any]]  # per shard: the blocks of snapshots its pass held, and its peak memory

    def to_dict(self) -> dict:
        return asdict(self)


def block_rows(num_snapshots: int, block_bytes: int = BLOCK_BYTES) -> int:
    return max(1, block_bytes // (4 * num_snapshots))


def snapshot_blocks(
    store: RunStore, rels: list[str], rows: int, span: slice | None = None, held: dict[str, int] | None = None
) -> Iterator[np.ndarray]:
    """Yield read-only t x rows float32 blocks of ``span`` of one shard's rows: row i of a block is snapshot i.

    A background thread reads the next block straight into place, past the page cache where it can
    (each file is read once), ``IO_THREADS`` files at a time, while the caller computes on this one;
    others feed what was read to the checksums, a group of files each, so that reading only waits
    on storage. A block is valid until the next is asked for: its memory then takes a later block,
    because memory the process has not touched yet costs more to map than reading into it
    (benchmarks/README.md, basis). Every file is read to its end, and its checksum verified, after
    the span's last block. ``held["snapshot_bytes"]`` counts the bytes of the blocks' memory.
    """
    readers = []
    free: collections.deque[np.ndarray] = collections.deque()  # the memory of blocks the caller is done with
    try:
        for rel in rels:
            readers.append(store.row_reader(rel))
        length = readers[0].shape
        for reader in readers:
            if reader.shape != length or len(length) != 1:
                raise DldrError(
                    f"{store.abspath(reader.rel)} has shape {reader.shape}, expected {length} "
                    "like the other snapshots of its shard; re-run `dldr sample`"
                )
        span = span or slice(0, length[0])
        rows = max(1, min(rows, span.stop - span.start))  # no block larger than the span

        def read() -> Iterator[tuple[np.ndarray, np.ndarray, list[Future]]]:
            # one single-thread executor per group of files keeps each file's checksum in order
            with contextlib.ExitStack() as stack:
                io = stack.enter_context(ThreadPoolExecutor(IO_THREADS, thread_name_prefix="dldr-read"))
                hashers = [
                    stack.enter_context(ThreadPoolExecutor(1, thread_name_prefix="dldr-checksum"))
                    for _ in range(min(compute_threads(), len(readers)))
                ]
                hashing: list[Future] = []
                for reader in readers:
                    reader.skip(span.start)
                for start in range(span.start, span.stop, rows):
                    count = min(rows, span.stop - start)
                    if free:
                        raw = free.popleft()
                    else:
                        raw = paged_buffer(len(readers), rows * 4)
                        if held is not None:
                            held["snapshot_bytes"] = held.get("snapshot_bytes", 0) + raw.nbytes
                    pages, data = paged_rows(len(readers), count * 4, readers[0].offset, raw)
                    block = data.view(np.float32)
                    updates = list(io.map(RowReader.read_into, readers, block, pages))
                    block.flags.writeable = False  # the checksums read it after it is handed on
                    hashed = [
                        hasher.submit(lambda group: [update() for update in group], updates[k :: len(hashers)])
                        for k, hasher in enumerate(hashers)
                    ]
                    hashing += hashed
                    yield block, raw, hashed
                for future in hashing:  # every block's checksum updates come before the files' ends
                    future.result()
            for reader in readers:
                reader.finish()

        for block, raw, hashed in prefetched(read()):
            yield block
            for future in hashed:  # done long since, as a rule; this also bounds how far the checksums lag
                future.result()
            free.append(raw)
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


def random_rows(rows: slice, dim: int, seed: int) -> np.ndarray:
    """Rows ``rows`` of the unnormalised random basis: global block k of rows is drawn from the stream (seed, k)."""
    first, last = rows.start // RANDOM_BLOCK_ROWS, (rows.stop - 1) // RANDOM_BLOCK_ROWS
    draws = np.concatenate(
        [np.random.default_rng([seed, k]).standard_normal((RANDOM_BLOCK_ROWS, dim)) for k in range(first, last + 1)]
    )
    offset = first * RANDOM_BLOCK_ROWS
    return draws[rows.start - offset : rows.stop - offset]


@dataclass
class ShardSums:
    """What one read of a shard contributes: the Gram of its shifted snapshots S_r (t x t) and,
    for a random basis R, R_r^T R_r (d x d) and R_r^T S_r (d x t)."""

    gram: np.ndarray
    rtr: np.ndarray | None = None
    rts: np.ndarray | None = None
    memory: dict[str, Any] | None = None  # ``Peak.figures`` of the pass, wherever it ran, and the bytes it read


def shard_pass(
    store: RunStore, rels: list[str], offset: int, dim: int, kind: str, seed: int, block_bytes: int = BLOCK_BYTES
) -> ShardSums:
    """Read one shard's snapshots (whose first row is parameter ``offset``) once, summing in float64.

    Each block's columns are cut into one run per thread; the chunks' sums are added in column
    order, so the result does not depend on the number of threads.
    """
    peak, held = Peak(), {"snapshot_bytes": 0}
    read_before = sum(store.bytes_read.values())
    t = len(rels)
    sums = ShardSums(np.zeros((t, t)))
    if kind == "random":
        sums.rtr, sums.rts = np.zeros((dim, dim)), np.zeros((dim, t))
    row = offset
    with compute_pool() as (pool, threads):
        for block in snapshot_blocks(store, rels, block_rows(t, block_bytes), held=held):
            r = random_rows(slice(row, row + block.shape[1]), dim, seed) if kind == "random" else None
            for part in pool.map(functools.partial(chunk_sums, block, r), column_runs(block.shape[1], threads)):
                for chunk in part:
                    sums.gram += chunk.gram
                    if r is not None:
                        sums.rtr += chunk.rtr
                        sums.rts += chunk.rts
            row += block.shape[1]
    sums.memory = peak.figures(**held, bytes_read=sum(store.bytes_read.values()) - read_before)
    return sums


def chunk_sums(block: np.ndarray, r: np.ndarray | None, cols: slice) -> list[ShardSums]:
    """The sums of each GRAM_CHUNK_ROWS-column chunk of ``block[:, cols]``, its rows shifted by row 0."""
    t = block.shape[0]
    tiled = -(-t // GRAM_TILE) * GRAM_TILE
    shifted = np.zeros((tiled, GRAM_CHUNK_ROWS))  # rows past t stay zero, so every tile is whole
    chunks = [
        slice(start, min(start + GRAM_CHUNK_ROWS, cols.stop)) for start in range(cols.start, cols.stop, GRAM_CHUNK_ROWS)
    ]
    grams = np.empty((len(chunks), tiled, tiled))
    if r is None:
        shifted_grams(block, cols.start, cols.stop, shifted, grams)
        return [ShardSums(g[:t, :t]) for g in grams]
    sums = []
    for chunk, g in zip(chunks, grams, strict=True):
        shifted_grams(block, chunk.start, chunk.stop, shifted, g[None])
        x = shifted[:t, : chunk.stop - chunk.start]
        sums.append(ShardSums(g[:t, :t], r[chunk].T @ r[chunk], r[chunk].T @ x.T))
    return sums


@numba.njit(numba.void(_MATRIX, numba.int64, _MATRIX), fastmath={"reassoc", "contract"}, nogil=True, cache=True)
def chunk_gram(x: np.ndarray, n: int, out: np.ndarray) -> None:
    """out = x[:, :n] @ x[:, :n].T in float64, for a C-ordered x with a multiple of GRAM_TILE rows.

    BLAS's dsyrk copies a short, wide chunk into its own layout before it multiplies (18% of phase
    2's time against 27% multiplying). A chunk's rows stay in cache, so this sums 4 x 4 tiles of
    the lower triangle straight from them, vectorised along the columns, and mirrors it: a chunk's
    shift and product took 1.6x less time than with dsyrk (benchmarks/README.md, basis). Only the
    order of the float64 sums may change ("reassoc"); NaN and inf propagate as usual.
    """
    t = x.shape[0]
    for a in range(0, t, 4):
        for b in range(0, a + 1, 4):
            s00 = s01 = s02 = s03 = s10 = s11 = s12 = s13 = 0.0
            s20 = s21 = s22 = s23 = s30 = s31 = s32 = s33 = 0.0
            for i in range(n):
                a0, a1, a2, a3 = x[a, i], x[a + 1, i], x[a + 2, i], x[a + 3, i]
                b0, b1, b2, b3 = x[b, i], x[b + 1, i], x[b + 2, i], x[b + 3, i]
                s00 += a0 * b0
                s01 += a0 * b1
                s02 += a0 * b2
                s03 += a0 * b3
                s10 += a1 * b0
                s11 += a1 * b1
                s12 += a1 * b2
                s13 += a1 * b3
                s20 += a2 * b0
                s21 += a2 * b1
                s22 += a2 * b2
                s23 += a2 * b3
                s30 += a3 * b0
                s31 += a3 * b1
                s32 += a3 * b2
                s33 += a3 * b3
            out[a, b], out[a, b + 1], out[a, b + 2], out[a, b + 3] = s00, s01, s02, s03
            out[a + 1, b], out[a + 1, b + 1], out[a + 1, b + 2], out[a + 1, b + 3] = s10, s11, s12, s13
            out[a + 2, b], out[a + 2, b + 1], out[a + 2, b + 2], out[a + 2, b + 3] = s20, s21, s22, s23
            out[a + 3, b], out[a + 3, b + 1], out[a + 3, b + 2], out[a + 3, b + 3] = s30, s31, s32, s33
    for a in range(t):
        for b in range(a + 1, t):
            out[a, b] = out[b, a]


@numba.njit(numba.void(_BLOCK, numba.int64, numba.int64, _MATRIX, numba.float64[:, :, ::1]), nogil=True, cache=True)
def shifted_grams(block: np.ndarray, start: int, stop: int, shifted: np.ndarray, grams: np.ndarray) -> None:
    """grams[k] = S_k S_k^T, S_k the k-th GRAM_CHUNK_ROWS-column chunk of ``block[:, start:stop]``
    with its rows shifted by row 0, which ``shifted`` holds after.

    The shift is exact: float32 values are converted to float64 before they are subtracted. One call
    covers a run of chunks, so the loop over them runs without the GIL.
    """
    t = block.shape[0]
    for k in range(grams.shape[0]):
        lo = start + k * GRAM_CHUNK_ROWS
        n = min(GRAM_CHUNK_ROWS, stop - lo)
        for row in range(t):
            for i in range(n):
                shifted[row, i] = np.float64(block[row, lo + i]) - np.float64(block[0, lo + i])
        chunk_gram(shifted, n, grams[k])


def column_runs(columns: int, parts: int) -> list[slice]:
    """At most ``parts`` contiguous runs of ``columns`` columns, cut at multiples of GRAM_CHUNK_ROWS."""
    chunks = -(-columns // GRAM_CHUNK_ROWS)
    cuts = [min(columns, chunks * i // parts * GRAM_CHUNK_ROWS) for i in range(parts + 1)]
    return [slice(a, b) for a, b in itertools.pairwise(cuts) if a < b]


def compute_threads() -> int:
    """Threads for a pass's arithmetic: OMP_NUM_THREADS where set (Ray sets it to a task's CPUs),
    else every CPU this process may run on."""
    configured = os.environ.get("OMP_NUM_THREADS", "")
    if configured.isdigit() and int(configured) > 0:
        return int(configured)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


@contextlib.contextmanager
def compute_pool() -> Iterator[tuple[ThreadPoolExecutor, int]]:
    """A pool of ``compute_threads()`` threads, with BLAS single-threaded meanwhile.

    The Gram kernels, numpy's ufuncs and BLAS release the GIL, so the threads use as many cores;
    BLAS's own threads would only oversubscribe them (the products are t x t, too small to split well).
    """
    threads = compute_threads()
    with threadpool_limits(1, user_api="blas"), ThreadPoolExecutor(threads, thread_name_prefix="dldr-compute") as pool:
        yield pool, threads


def check_dim(dim: int, num_snapshots: int) -> None:
    if dim < 1:
        raise DldrError(f"--dim must be at least 1, got {dim}")
    if dim >= num_snapshots:
        raise DldrError(
            f"--dim {dim} needs at least {dim + 1} snapshots, phase 1 takes {num_snapshots}; sample more "
            "(more --sample-epochs or a smaller --snapshot-every) or lower --dim"
        )


def decompose(gram: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (descending, all t) and the top-``dim`` eigenvectors of the centred Gram (``dim``
    passed ``check_dim`` before the read)."""
    t = gram.shape[0]
    eigvals, eigvecs = np.linalg.eigh(gram)
    eigvals, eigvecs = np.clip(eigvals[::-1], 0.0, None), eigvecs[:, ::-1]
    rank = int(np.sum(eigvals > RANK_RTOL * eigvals[0])) if eigvals[0] > 0 else 0
    if rank < dim:
        raise DldrError(
            f"the {t} snapshots span only {rank} directions, fewer than --dim {dim}; "
            "sample a trajectory that moves more (a larger --lr, more snapshots) "
            f"or use --dim {max(rank, 1)}"
        )
    return eigvals, eigvecs[:, :dim]


def build_basis(
    store: RunStore,
    dim: int,
    kind: str = "trajectory",
    seed: int = 0,
    block_bytes: int = BLOCK_BYTES,
    map_shards: ShardMap | None = None,
    before_write: Callable[[], None] = lambda: None,
    write: bool = True,
) -> BasisReport:
    """Phase 2: one read of every shard, the summed Gram, ``eigh``, and the t x d coefficients of P.

    This process only holds t x t and d x t matrices; ``map_shards`` (default: ``shard_map``, in
    this process) runs the streamed pass over each shard. Nothing is written until the basis is
    known (``before_write`` is called then), so a phase 2 that fails leaves the old basis as it
    was; with ``write`` False (the ranks other than 0), nothing at all.
    """
    start = time.perf_counter()
    map_shards = map_shards or shard_map(store)
    if kind not in ("trajectory", "random"):
        raise DldrError(f"unknown subspace {kind!r}; use trajectory or random")
    shards = store.snapshot_shards()
    t = len(shards[0])
    check_dim(dim, t)
    lengths = [store.manifest[rels[0]]["shape"][0] for rels in shards]
    offsets = np.cumsum([0, *lengths[:-1]]).tolist()
    sums = map_shards(
        shard_pass, [(rels, offset, dim, kind, seed, block_bytes) for rels, offset in zip(shards, offsets, strict=True)]
    )
    centring = np.eye(t) - 1.0 / t
    gram = centring @ np.sum([s.gram for s in sums], axis=0) @ centring
    if not np.isfinite(gram).all():
        raise DldrError(
            f"the snapshots of {store.url} hold NaN or infinite values (a diverged phase 1, or damaged "
            "files); re-run `dldr sample`, with a lower --lr or a longer --warmup-epochs if it diverged"
        )
    eigvals, eigvecs = decompose(gram, dim)
    if kind == "trajectory":  # span(P) is the top-d eigenspace: its share of the variance
        coeffs = eigvecs / np.sqrt(eigvals[:dim])
        applied = coeffs.astype(np.float32).astype(np.float64)  # as ``basis_rows`` applies them
        gram_p = applied.T @ gram @ applied
        explained = float(eigvals[:dim].sum() / eigvals.sum())
    else:
        rtr = np.sum([s.rtr for s in sums], axis=0)
        scale = 1.0 / np.sqrt(np.diag(rtr))
        gram_p = scale[:, None] * rtr * scale
        proj = scale[:, None] * np.sum([s.rts for s in sums], axis=0) @ centring
        explained = captured_variance(gram_p, proj, eigvals)
    report = BasisReport(
        kind=kind,
        dim=dim,
        seed=seed,
        num_snapshots=t,
        num_params=sum(lengths),
        num_shards=len(shards),
        explained_variance_ratio=explained,
        orthonormality_error=float(np.abs(gram_p - np.eye(dim)).max()),
        seconds=time.perf_counter() - start,
        memory=[s.memory for s in sums],
    )
    if kind == "trajectory" and report.orthonormality_error > ORTHONORMALITY_TOL:
        raise DldrError(
            f"the basis is not orthonormal (max |P^T P - I| = {report.orthonormality_error:.2e}): "
            "the trajectory is nearly degenerate; lower --dim or sample longer"
        )
    if not write:
        return report
    before_write()
    store.remove("basis/")
    store.save_array("basis/gram.npy", gram)
    store.save_array("basis/eigvals.npy", eigvals)
    store.save_array(COEFFICIENTS if kind == "trajectory" else SCALE, coeffs if kind == "trajectory" else scale)
    store.write_json(REPORT, report.to_dict())  # last: it marks the basis complete
    return report


def captured_variance(gram_p: np.ndarray, proj: np.ndarray, eigvals: np.ndarray) -> float:
    """Fraction of the trajectory's variance inside span(P): tr(W^T P (P^T P)^-1 P^T W) / tr(W^T W)."""
    return float(np.trace(proj.T @ np.linalg.solve(gram_p, proj)) / eigvals.sum())


def basis_report(store: RunStore) -> dict[str, Any]:
    """The run's basis/report.json (kind, d, seed, sizes), which marks a complete phase 2."""
    if not store.exists(REPORT):
        raise DldrError(f"{store.url} has no basis; run `dldr basis --run-dir {store.url}` first")
    report = store.read_json(REPORT)
    fields = {"kind": str, "dim": int, "seed": int, "num_snapshots": int, "num_params": int}
    if (
        not isinstance(report, dict)
        or any(type(report.get(k)) is not kind for k, kind in fields.items())
        or report["kind"] not in ("trajectory", "random")
        or min(report["dim"], report["num_params"]) < 1
    ):
        raise DldrError(f"{store.abspath(REPORT)} is not a basis report; re-run `dldr basis --run-dir {store.url}`")
    return report


def _stored(store: RunStore, rel: str, shape: tuple[int, ...]) -> np.ndarray:
    """An array of phase 2, refused unless it has the shape its report implies."""
    array = store.load_array(rel)
    if array.shape != shape:
        raise DldrError(
            f"{store.abspath(rel)} has shape {array.shape}, but the basis report implies {shape}; "
            f"re-run `dldr basis --run-dir {store.url}`"
        )
    return array


def shard_path(rank: int, num_shards: int) -> str:
    return f"basis/{shard_name(rank, num_shards)}.npy"


def basis_shard(
    store: RunStore,
    rows: slice,
    rank: int,
    num_shards: int,
    dtype: np.dtype = BASIS_DTYPES["fp32"],
    held: dict[str, int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``basis_rows`` for rank ``rank`` of ``num_shards``, which holds ``rows``; the first time (or in another
    dtype), its rows of P are also written to basis/shard-RRRRR-of-NNNNN.npy, where readers of the run find
    the basis."""
    p, mean = basis_rows(store, rows, dtype=dtype, held=held)
    rel = shard_path(rank, num_shards)
    # phase 2 removes them with the basis they belong to
    if not (store.exists(rel) and store.manifest[rel].get("dtype") == p.dtype.str and _intact(store, rel)):
        store.save_array(rel, p)
    return p, mean


def _intact(store: RunStore, rel: str) -> bool:
    """Whether ``rel`` still matches its checksum; one that does not is written again."""
    try:
        store.row_reader(rel).finish()
    except DldrError:
        return False
    return True


def to_bf16(values: np.ndarray) -> np.ndarray:
    """``values`` rounded to the nearest bfloat16 (ties to even, as torch rounds), as uint16 bit patterns."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    return ((bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16).astype(np.uint16)


def basis_tensor(rows: np.ndarray) -> torch.Tensor:
    """Rows of P as ``basis_rows`` gives them (float32, or bfloat16 bit patterns) as a tensor sharing their memory."""
    return torch.from_numpy(rows.view(np.int16)).view(torch.bfloat16) if rows.dtype == BF16 else torch.from_numpy(rows)


def centred_rows(block: np.ndarray, coeffs: np.ndarray | None, p: np.ndarray, mean: np.ndarray, cols: slice) -> None:
    """Columns ``cols`` of a block: each row's snapshot mean into ``mean`` and, given the coefficients C,
    the rows of P = (block - mean)^T C into ``p`` (float32, or bf16 bits), a chunk at a time (it stays in cache)."""
    mean[cols] = block[:, cols].mean(axis=0, dtype=np.float64)
    if coeffs is not None:
        for start in range(cols.start, cols.stop, GRAM_CHUNK_ROWS):
            chunk = slice(start, min(start + GRAM_CHUNK_ROWS, cols.stop))
            centred = (block[:, chunk] - mean[chunk]).T
            if p.dtype == BF16:
                p[chunk] = to_bf16(centred @ coeffs)
            else:
                np.matmul(centred, coeffs, out=p[chunk])


def basis_rows(
    store: RunStore,
    rows: slice,
    block_bytes: int = BLOCK_BYTES,
    dtype: np.dtype = BASIS_DTYPES["fp32"],
    held: dict[str, int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``rows`` of the basis P (in ``dtype``: float32, or ``BF16``) and of the snapshot mean m (float32):
    what one phase 3 rank holds.

    One read of the snapshot files these rows lie in; for a trajectory basis, P's rows are the
    centred snapshot rows times the stored coefficients C. ``held`` counts the snapshot blocks' bytes.
    """
    report = basis_report(store)
    kind, dim = report["kind"], report["dim"]
    if rows.stop > report["num_params"]:
        raise ValueError(f"rows {rows} lie outside the basis's {report['num_params']} rows")
    shards = store.snapshot_shards()
    t = len(shards[0])
    if t != report["num_snapshots"]:
        raise DldrError(
            f"{store.url} holds {t} snapshots but its basis was built from {report['num_snapshots']}; "
            f"re-run `dldr basis --run-dir {store.url}`"
        )
    coeffs = _stored(store, COEFFICIENTS, (t, dim)).astype(np.float32) if kind == "trajectory" else None
    scale = _stored(store, SCALE, (dim,)) if kind == "random" else None
    p = np.empty((rows.stop - rows.start, dim), dtype=dtype)
    mean = np.empty(rows.stop - rows.start, dtype=np.float32)
    with compute_pool() as (pool, threads):
        for row, block in row_blocks(store, shards, rows, block_bytes, held):
            n = block.shape[1]
            p_block, m_block = p[row - rows.start :][:n], mean[row - rows.start :][:n]
            if coeffs is None:
                drawn = random_rows(slice(row, row + n), dim, report["seed"]) * scale
                p_block[:] = to_bf16(drawn) if dtype == BF16 else drawn
            list(pool.map(functools.partial(centred_rows, block, coeffs, p_block, m_block), column_runs(n, threads)))
    return p, mean


def row_blocks(
    store: RunStore,
    shards: list[list[str]],
    rows: slice,
    block_bytes: int = BLOCK_BYTES,
    held: dict[str, int] | None = None,
) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, block) over parameter rows ``rows`` of the files ``shards`` (each shard's files
    hold consecutive rows, shard after shard), reading only the shards the rows lie in
    (``snapshot_blocks``): how every reader of some rows of the snapshots gets them."""
    offset = 0
    for rels in shards:
        length = store.manifest[rels[0]]["shape"][0]
        lo, hi = max(rows.start, offset), min(rows.stop, offset + length)
        if lo < hi:
            for block in snapshot_blocks(
                store, rels, block_rows(len(rels), block_bytes), slice(lo - offset, hi - offset), held
            ):
                yield lo, block
                lo += block.shape[1]
        offset += length
    if offset < rows.stop:
        raise ValueError(f"rows {rows} lie outside the snapshots' {offset} rows")


def snapshot_rows(store: RunStore, index: int, rows: slice) -> np.ndarray:
    """Rows ``rows`` of snapshot ``index`` (0: the first, -1: the last): phase 3's w_start for --start
    first or last (the mean comes with P's rows, ``basis_rows``)."""
    out = np.empty(rows.stop - rows.start, dtype=np.float32)
    for row, block in row_blocks(store, [[rels[index]] for rels in store.snapshot_shards()], rows):
        out[row - rows.start :][: block.shape[1]] = block[0]
    return out
