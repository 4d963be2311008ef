import itertools

import numpy as np
import pytest

from dldr.basis import (
    BLOCK_BYTES,
    GRAM_CHUNK_ROWS,
    basis_rows,
    build_basis,
    chunk_gram,
    column_runs,
    shard_pass,
)
from dldr.errors import DldrError
from dldr.store import RunStore, paged_buffer, snapshot_path
from tests.helpers import largest_principal_angle, low_rank_trajectory, write_trajectory


def _load_basis(store: RunStore) -> np.ndarray:
    return basis_rows(store, slice(0, store.read_json("basis/report.json")["num_params"]))[0]


@pytest.mark.parametrize("num_shards", [1, 3])
def test_basis_is_top_singular_subspace_of_centred_snapshots(store, num_shards):
    trajectory = low_rank_trajectory(dim=601, steps=12, rank=8)
    write_trajectory(store, trajectory, num_shards)
    dim = 5
    # a small block size makes the stream cross many row blocks per shard
    report = build_basis(store, dim, block_bytes=4 * 12 * 37)
    # phase 2 reads every snapshot file once, and writes nothing of size D
    assert all(store.bytes_read[rel] == store.manifest[rel]["bytes"] - 128 for rel in store.files("snapshots/"))
    shapes = [store.manifest[rel].get("shape", []) for rel in store.files("basis/")]
    assert max(np.prod(shape) for shape in shapes) <= 12 * 12

    stored = trajectory.astype(np.float32).astype(np.float64)
    centred = stored - stored.mean(axis=1, keepdims=True)
    u, s, _ = np.linalg.svd(centred, full_matrices=False)
    basis, mean = basis_rows(store, slice(0, 601), block_bytes=4 * 12 * 37)
    assert basis.shape == (601, dim) and basis.dtype == np.float32
    assert largest_principal_angle(basis, u[:, :dim]) < 1e-4
    # each column is the singular vector itself (up to sign), not just the same span
    np.testing.assert_allclose(np.abs(np.sum(basis * u[:, :dim], axis=0)), 1.0, atol=1e-5)
    np.testing.assert_allclose(basis.T.astype(np.float64) @ basis, np.eye(dim), atol=1e-5)
    np.testing.assert_allclose(store.load_array("basis/eigvals.npy")[:dim], s[:dim] ** 2, rtol=1e-8)
    assert report.explained_variance_ratio == pytest.approx(np.sum(s[:dim] ** 2) / np.sum(s**2), rel=1e-7)
    assert report.orthonormality_error < 1e-5
    np.testing.assert_allclose(mean, stored.mean(axis=1), rtol=1e-6)
    # a phase 3 rank whose rows cross the shards' boundaries gets exactly those rows of P and m
    part, part_mean = basis_rows(store, slice(150, 451))
    np.testing.assert_allclose(part, basis[150:451], rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(part_mean, mean[150:451])


def test_sharding_does_not_change_the_basis(tmp_path):
    trajectory = low_rank_trajectory(dim=500, steps=10, rank=9, seed=3)
    bases = []
    for num_shards in (1, 2):
        store = RunStore(str(tmp_path / f"n{num_shards}"))
        write_trajectory(store, trajectory, num_shards)
        build_basis(store, 6)
        bases.append(_load_basis(store))
    assert largest_principal_angle(*bases) < 1e-5


def test_random_basis_has_unit_columns_and_captures_less_variance(tmp_path):
    trajectory = low_rank_trajectory(dim=800, steps=10, rank=9)
    ratios = {}
    for kind in ("trajectory", "random"):
        store = RunStore(str(tmp_path / kind))
        write_trajectory(store, trajectory, 2)
        ratios[kind] = build_basis(store, 4, kind=kind, seed=1).explained_variance_ratio
        basis = _load_basis(store)
        np.testing.assert_allclose(np.linalg.norm(basis.astype(np.float64), axis=0), 1.0, rtol=1e-5)
        if kind == "random":  # drawn by global row blocks: the same rows whichever rows a rank asks for
            np.testing.assert_array_equal(basis_rows(store, slice(333, 800))[0], basis[333:])
    assert ratios["random"] < 0.2 < 0.9 < ratios["trajectory"]


@pytest.mark.parametrize("block_bytes", [BLOCK_BYTES, 4 * 8 * 3000])
def test_gram_is_exact_and_the_same_on_any_number_of_threads(tmp_path, monkeypatch, block_bytes):
    # a random walk of full-precision float32 values: unlike a low-rank trajectory's, its float64
    # partial sums round, so adding them in another order gives other bits
    rng = np.random.default_rng(5)
    # 7 snapshots: not a whole number of the kernel's 4-snapshot tiles
    trajectory = np.cumsum(rng.standard_normal((3 * GRAM_CHUNK_ROWS + 500, 7)), axis=1)
    grams = []
    for threads in ("1", "3"):
        monkeypatch.setenv("OMP_NUM_THREADS", threads)
        store = RunStore(str(tmp_path / threads))
        write_trajectory(store, trajectory, 1)
        grams.append(shard_pass(store, store.snapshot_shards()[0], 0, 2, "trajectory", 0, block_bytes).gram)
    # the chunks' sums are added in column order, whichever thread computed them
    np.testing.assert_array_equal(grams[0], grams[1])
    stored = trajectory.astype(np.float32).astype(np.float64)
    shifted = stored - stored[:, :1]
    np.testing.assert_allclose(grams[0], shifted.T @ shifted, rtol=1e-12, atol=1e-12 * np.abs(grams[0]).max())


@pytest.mark.parametrize("t, n", [(4, 1), (8, 13), (12, GRAM_CHUNK_ROWS), (64, 1000)])
def test_gram_kernel_is_the_float64_product_of_the_first_n_columns(t, n):
    x = np.random.default_rng(t).standard_normal((t, n + 9))
    x[:, n:] = np.nan  # past n: never read
    out = np.full((t, t), np.nan)  # every entry is written
    chunk_gram(x, n, out)
    expected = x[:, :n] @ x[:, :n].T
    np.testing.assert_allclose(out, expected, rtol=1e-13, atol=1e-13 * np.abs(expected).max())
    np.testing.assert_array_equal(out, out.T)


@pytest.mark.parametrize("columns, parts", [(1, 3), (2048, 2), (2049, 2), (5 * 2048 + 7, 3)])
def test_column_runs_cover_the_columns_in_whole_chunks(columns, parts):
    runs = column_runs(columns, parts)
    assert len(runs) == min(parts, -(-columns // GRAM_CHUNK_ROWS))
    assert runs[0].start == 0 and runs[-1].stop == columns
    assert all(a.stop == b.start and a.stop % GRAM_CHUNK_ROWS == 0 for a, b in itertools.pairwise(runs))


def test_dim_must_be_below_number_of_snapshots(store):
    write_trajectory(store, low_rank_trajectory(steps=6), 1)
    with pytest.raises(DldrError, match="--dim 6 needs at least 7 snapshots, phase 1 takes 6"):
        build_basis(store, 6)
    assert not store.files("basis/")


def test_rank_deficient_trajectory_is_refused(store):
    trajectory = np.repeat(low_rank_trajectory(steps=3, rank=3), 4, axis=1)  # 12 snapshots, 2 directions
    write_trajectory(store, trajectory, 1)
    with pytest.raises(DldrError, match="span only 2 directions"):
        build_basis(store, 4)


def test_corrupt_and_missing_snapshots_are_named(store, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # three checksum threads: the victim is in the second's files
    write_trajectory(store, low_rank_trajectory(steps=6), 2)
    victim = snapshot_path(1, 2, 4)
    path = store.abspath(victim)
    raw = bytearray(open(path, "rb").read())
    raw[-7] ^= 0x01
    open(path, "wb").write(bytes(raw))
    with pytest.raises(DldrError, match=f"{victim}.* is corrupt"):
        build_basis(store, 2)
    store.fs.rm(path)
    with pytest.raises(DldrError, match=f"{victim} is missing"):
        build_basis(store, 2)
    assert not store.files("basis/")


def test_prefetched_hands_over_items_and_errors_and_stops_early():
    from dldr.basis import prefetched

    assert list(prefetched(iter(range(50)), depth=2)) == list(range(50))

    def failing():
        yield 1
        raise DldrError("bad block")

    with pytest.raises(DldrError, match="bad block"):
        list(prefetched(failing()))
    produced = []

    def endless():
        while True:
            produced.append(len(produced))
            yield produced[-1]

    items = prefetched(endless(), depth=2)
    assert [next(items) for _ in range(3)] == [0, 1, 2]
    items.close()  # the consumer stops: the producer stops too instead of blocking forever
    assert len(produced) <= 3 + 2 + 1


def test_snapshot_blocks_are_the_files_rows_read_into_reused_memory(store, monkeypatch):
    import dldr.basis

    trajectory = low_rank_trajectory(dim=3001, steps=7, rank=3).astype(np.float32)
    write_trajectory(store, trajectory, 1)
    buffers = []
    monkeypatch.setattr(dldr.basis, "paged_buffer", lambda *a: buffers.append(a) or paged_buffer(*a))
    start, rows = 5, 100
    for block in dldr.basis.snapshot_blocks(store, store.snapshot_shards()[0], rows, slice(start, 2990)):
        # every row of a block comes from its own file, at the block's place, in memory read into before
        np.testing.assert_array_equal(block, trajectory[start : start + block.shape[1]].T)
        start += block.shape[1]
    assert start == 2990
    assert len(buffers) <= 4  # 30 blocks: the one in use, two read ahead, one being read
