import io
import json
import os

import numpy as np
import pytest
import xxhash

from dldr import store as store_module
from dldr.errors import DldrError
from dldr.store import ALIGN, RunStore, direct_io, paged_rows


def test_manifest_records_a_checksum_and_a_flipped_byte_is_caught(store):
    rel = "snapshots/shard-00000-of-00001/step-000000.npy"
    array = np.arange(1000, dtype=np.float32)
    store.save_array(rel, array)
    path = store.abspath(rel)
    manifest = json.load(open(store.abspath("manifest.json")))["files"]
    entry = manifest[rel]
    assert entry["xxh3_128"] == xxhash.xxh3_128(open(path, "rb").read()).hexdigest()
    assert entry["shape"] == [1000] and entry["dtype"] == "<f4"
    assert store.checksum(rel) == entry["xxh3_128"]
    np.testing.assert_array_equal(store.load_array(rel), array)
    reader = store.row_reader(rel)
    reader.read(1000)
    reader.finish()

    raw = bytearray(open(path, "rb").read())
    raw[500] ^= 0x10
    open(path, "wb").write(bytes(raw))
    with pytest.raises(DldrError, match=r"step-000000\.npy is corrupt \(its xxh3_128 checksum.*re-run `dldr sample`"):
        store.load_array(rel)
    reader = store.row_reader(rel)
    reader.read(1000)
    with pytest.raises(DldrError, match="is corrupt"):
        reader.finish()


def test_an_entry_without_a_checksum_is_a_clear_error(store):
    rel = "snapshots/shard-00000-of-00001/step-000000.npy"
    store.save_array(rel, np.zeros(3, dtype=np.float32))
    store.record({rel: {k: v for k, v in store.manifest[rel].items() if k != "xxh3_128"}})
    with pytest.raises(DldrError, match=r"records no checksum \(xxh3_128\) for snapshots/.*re-run `dldr sample`"):
        RunStore(store.url).load_array(rel)


def read_paged(reader, counts, misaligned=False):
    """``reader``'s rows, ``counts`` at a time, each read into a fresh ``paged_rows`` page."""
    rows = []
    for count in counts:
        pages, data = paged_rows(1, count * 4, reader.offset)
        page = pages[0]
        if misaligned:  # a page that does not start at a page boundary
            page = np.empty(len(page) + ALIGN + 1, dtype=np.uint8)[1:]
            data = page[: count * 4][None]
        out = data[0].view(np.float32)
        reader.read_into(out, page)()
        rows.append(out.copy())
    return np.concatenate(rows)


def test_rows_read_past_the_page_cache_are_the_files_rows(store):
    """O_DIRECT reads whole pages around the rows: from an offset inside a page, up to the file's end,
    then on through the cache for the rest; a page it cannot use is read through the cache."""
    rel = "snapshots/shard-00000-of-00001/step-000000.npy"
    array = np.random.default_rng(0).standard_normal(10_000).astype(np.float32)
    store.save_array(rel, array)
    reader = store.row_reader(rel)
    reader.skip(3)  # the data start at byte 128 of the file: with these 3 rows, 140 bytes into a page
    np.testing.assert_array_equal(read_paged(reader, [1000, 1, 2500]), array[3:3504])
    np.testing.assert_array_equal(reader.read(500), array[3504:4004])
    np.testing.assert_array_equal(read_paged(reader, [3000, 2996]), array[4004:])
    reader.finish()  # the checksum covers every byte, however it was read
    assert reader.direct_bytes == ((1000 + 1 + 2500 + 3000 + 2996) * 4 if direct_io(store.abspath(rel)) else 0)

    reader = store.row_reader(rel)
    np.testing.assert_array_equal(read_paged(reader, [4000, 6000], misaligned=True), array)
    reader.finish()
    assert reader.direct_bytes == 0


def test_a_truncated_file_is_named_however_it_is_read(store):
    """A file shorter than its record is refused as it is opened; one cut short while it is read, as it is read."""
    rel = "snapshots/shard-00000-of-00001/step-000000.npy"
    store.save_array(rel, np.arange(5000, dtype=np.float32))
    size = os.path.getsize(store.abspath(rel))
    for direct in (True, False):
        reader = store.row_reader(rel)
        with open(store.abspath(rel), "r+b") as f:
            f.truncate(size - 100)
        with pytest.raises(DldrError, match=r"step-000000\.npy is truncated; re-run `dldr sample`"):
            read_paged(reader, [4000, 1000]) if direct else reader.read_into(np.empty(5000, dtype=np.float32))
        with pytest.raises(
            DldrError,
            match=rf"step-000000\.npy is corrupt \({size - 100} bytes, manifest.json "
            rf"records {size}\); re-run `dldr sample`",
        ):
            store.row_reader(rel)
        store.save_array(rel, np.arange(5000, dtype=np.float32))


def test_a_failed_write_leaves_neither_file_nor_manifest_entry(store, tmp_path):
    store.write_bytes("a.txt", b"kept")
    with pytest.raises(RuntimeError):
        with store.writer("b.bin") as f:
            f.write(b"partial")
            raise RuntimeError("interrupted")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["a.txt", "manifest.json"]
    assert list(RunStore(str(tmp_path / "run")).manifest) == ["a.txt"]


def test_row_blocks_round_trip_over_an_fsspec_url():
    store = RunStore("memory://dldr-test-run")
    matrix = np.random.default_rng(0).standard_normal((103, 7)).astype(np.float32)
    store.save_array("basis/shard-00000-of-00001.npy", matrix)
    reader = RunStore("memory://dldr-test-run").row_reader("basis/shard-00000-of-00001.npy")
    blocks = [reader.read(16) for _ in range(7)]
    reader.finish()
    np.testing.assert_array_equal(np.concatenate(blocks), matrix)


def test_unwritable_run_directory_is_a_clear_error(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    store = RunStore(str(tmp_path / "file" / "run"))
    with pytest.raises(DldrError, match="cannot write .*choose a writable --run-dir"):
        store.write_bytes("config.yaml", b"x")


def test_remove_forgets_files_under_a_prefix(store):
    for name in ("basis/a.npy", "basis/b.npy", "model.safetensors"):
        store.save_array(name, np.zeros(3))
    store.remove("basis/")
    assert list(RunStore(store.url).manifest) == ["model.safetensors"]
    assert not store.fs.exists(store.abspath("basis/a.npy"))


def test_every_write_is_fsynced_with_its_folder(store, monkeypatch):
    """The file, its new folders, the manifest and the run's folder reach the disk before a write returns."""
    synced = []
    fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), fsync(fd)))
    store.write_bytes("basis/report.json", b"{}")
    root = store.root
    tmp = next(path for path in synced if ".tmp-" in path and "basis" in path)
    manifest_tmp = next(path for path in synced if "manifest.json.tmp-" in path)
    assert synced == [os.path.dirname(root), root, tmp, f"{root}/basis", manifest_tmp, root]


@pytest.mark.parametrize(
    "array",
    [
        np.zeros(5, np.float32),
        np.zeros((3, 4)),
        np.zeros((), np.int64),
        np.zeros((2, 0), np.uint16),
        np.zeros((7, 1), ">i4"),
        np.zeros((1, 2, 3), bool),
        np.zeros((4, 4), np.float32, order="F"),
        np.zeros(2, np.complex64),
    ],
)
def test_npy_headers_are_read_as_numpy_reads_them(array):
    """Without ast: numpy's reader literal_evals the header, which CPython 3.11 can fail under threads."""
    data = io.BytesIO()
    np.lib.format.write_array(data, array, allow_pickle=False)
    theirs = io.BytesIO(data.getvalue())
    np.lib.format.read_magic(theirs)
    ours = io.BytesIO(data.getvalue())
    assert store_module._parse_header(ours) == np.lib.format.read_array_header_1_0(theirs)
    assert ours.tell() == theirs.tell()  # at the first data byte


@pytest.mark.parametrize(
    "header",
    [
        b"{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (3,), }",
        b"{'descr': '<f4', 'fortran_order': False, 'shape': (3,), 'x': __import__('os')}",
        b"{'descr': '<f4', 'fortran_order': False, 'shape': (-3,), }",
    ],
)
def test_npy_headers_other_than_a_plain_arrays_are_refused(header):
    padded = header + b" " * (-(10 + len(header) + 1) % 64) + b"\n"
    data = io.BytesIO(b"\x93NUMPY\x01\x00" + len(padded).to_bytes(2, "little") + padded)
    with pytest.raises(ValueError, match="not that of a plain array"):
        store_module._parse_header(data)
