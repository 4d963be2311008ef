"""The run directory: files over fsspec, each written whole and recorded with its checksum.

A file is written to a temporary name and renamed into place (on object stores, where a put is
already atomic, it is written under its final name), and only then recorded in
``manifest.json``, which is itself replaced atomically. Readers check the recorded checksum and
name the file when it does not match, so a torn or corrupted file is never used silently.
Arrays are .npy files read with ``allow_pickle=False``; large ones can be read and written in
row blocks so no process needs a whole snapshot matrix in memory.

The checksum is XXH3-128: it guards against torn and corrupted files (an adversary who can
change a file can change manifest.json too), and phase 2 checks every snapshot byte, where
sha256 cost as much CPU as the read itself (benchmarks/README.md, basis). Entries that earlier
versions recorded with sha256 are still verified with sha256.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import os
import posixpath
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, BinaryIO

import fsspec
import numpy as np
import xxhash
from fsspec.implementations.local import LocalFileSystem

from dldr.errors import DldrError

MANIFEST = "manifest.json"
# the manifest key of each checksum a reader verifies; new files get the first
CHECKSUMS: dict[str, Callable[[], Any]] = {"xxh3_128": xxhash.xxh3_128, "sha256": hashlib.sha256}
CHECKSUM = next(iter(CHECKSUMS))
# O_DIRECT reads need offsets, lengths and buffer addresses in multiples of the device's logical
# block size; a page is a multiple of every common one.
ALIGN = 4096

# Which command writes the files under each top-level folder, for "re-run X" advice.
_WRITER = {"snapshots": "dldr sample", "basis": "dldr basis", "data": "dldr sample"}


CONFIG = "config.yaml"  # the run's resolved configuration: a run directory is one that holds it


def holds_run(url: str) -> bool:
    return RunStore(url).exists(CONFIG)


def snapshot_path(rank: int, num_shards: int, step: int) -> str:
    return f"snapshots/{shard_name(rank, num_shards)}/step-{step:06d}.npy"


def shard_name(rank: int, num_shards: int) -> str:
    return f"shard-{rank:05d}-of-{num_shards:05d}"


class _HashingFile:
    """A file wrapper that feeds every byte read or written to a checksum (``CHECKSUMS[algorithm]``)."""

    def __init__(self, f: BinaryIO, algorithm: str = CHECKSUM):
        self.f = f
        self.hash = CHECKSUMS[algorithm]()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.hash.update(data)
        self.size += len(data)
        return self.f.write(data)

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.hash.update(data)
        self.size += len(data)
        return data


class RunStore:
    """A run directory at a local path or any fsspec URL (``memory://run``, ``s3://bucket/run``).

    One process owns ``manifest.json``. Other processes writing into the same run (the ranks
    of a distributed phase, Ray tasks) open it with ``owner=False``: their files are written
    the same way, but their manifest entries collect in ``journal`` for the owner to
    ``record``, so the manifest never has two writers.
    """

    def __init__(self, url: str, owner: bool = True):
        self.url = url
        self.owner = owner
        self.fs, self.root = fsspec.core.url_to_fs(url)
        self._atomic_rename = isinstance(self.fs, LocalFileSystem)
        self._lock = threading.Lock()
        self.manifest: dict[str, dict[str, Any]] = {}
        self.journal: dict[str, dict[str, Any]] = {}
        # bytes this process read from each file: what the memory tests of sharding check
        self.bytes_read: Counter[str] = Counter()
        self.reload()

    def reload(self) -> None:
        """Read manifest.json again, after another process (the ranks of a phase) updated it."""
        self.manifest = {}
        if self.fs.exists(self.abspath(MANIFEST)):
            with self.fs.open(self.abspath(MANIFEST), "rb") as f:
                self.manifest = json.load(f)["files"]

    @property
    def location(self) -> str:
        """The run's address as other processes must open it: local paths made absolute."""
        return self.root if self._atomic_rename else self.url

    def abspath(self, rel: str) -> str:
        return posixpath.join(self.root, rel)

    def exists(self, rel: str) -> bool:
        return rel in self.manifest

    def files(self, prefix: str) -> list[str]:
        return sorted(rel for rel in self.manifest if rel.startswith(prefix))

    def snapshot_shards(self) -> list[list[str]]:
        """The snapshot files of each shard, in rank order, each list in step order."""
        by_shard: dict[str, list[str]] = {}
        for rel in self.files("snapshots/"):
            by_shard.setdefault(rel.split("/")[1], []).append(rel)
        if not by_shard:
            raise DldrError(f"{self.url} holds no snapshots; run `dldr sample` (or `dldr fit`) first")
        num_shards = len(by_shard)
        expected = [shard_name(r, num_shards) for r in range(num_shards)]
        if sorted(by_shard) != expected:
            raise DldrError(f"{self.url} has snapshot folders {sorted(by_shard)}, expected {expected}; "
                            "re-run `dldr sample`")
        steps = [[posixpath.basename(rel) for rel in by_shard[name]] for name in expected]
        if any(s != steps[0] for s in steps):
            raise DldrError(f"the snapshot shards of {self.url} hold different steps; re-run `dldr sample`")
        return [by_shard[name] for name in expected]

    # ---- writing ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def writer(self, rel: str, **meta: Any) -> Iterator[_HashingFile]:
        """Yield a file to write ``rel`` into; it appears and enters the manifest only on success."""
        final = self.abspath(rel)
        tmp = f"{final}.tmp-{uuid.uuid4().hex[:8]}" if self._atomic_rename else final
        try:
            self.fs.makedirs(posixpath.dirname(final), exist_ok=True)
            with self.fs.open(tmp, "wb") as raw:
                f = _HashingFile(raw)
                yield f
            if self._atomic_rename:
                self.fs.mv(tmp, final)
        except OSError as e:
            self._discard(tmp)
            raise DldrError(f"cannot write {final}: {e.strerror or e}; choose a writable --run-dir") from e
        except BaseException:
            self._discard(tmp)
            raise
        self._record(rel, {CHECKSUM: f.hash.hexdigest(), "bytes": f.size, **meta})

    def _discard(self, tmp: str) -> None:
        with contextlib.suppress(OSError):
            if self._atomic_rename and self.fs.exists(tmp):
                self.fs.rm(tmp)

    def _record(self, rel: str, entry: dict[str, Any]) -> None:
        with self._lock:
            self.manifest[rel] = entry
            if self.owner:
                self._write_manifest()
            else:
                self.journal[rel] = entry

    def take_journal(self) -> dict[str, dict[str, Any]]:
        """The entries of the files written since the last call, for the owner to record."""
        with self._lock:
            taken, self.journal = self.journal, {}
        return taken

    def record(self, entries: dict[str, dict[str, Any]]) -> None:
        """Add the entries of files other processes wrote, with one manifest write."""
        if not self.owner:
            raise RuntimeError("only the store that owns manifest.json records entries")
        with self._lock:
            self.manifest.update(entries)
            self._write_manifest()

    def _write_manifest(self) -> None:
        data = json.dumps({"files": self.manifest}, indent=1, sort_keys=True).encode()
        final = self.abspath(MANIFEST)
        tmp = f"{final}.tmp-{uuid.uuid4().hex[:8]}" if self._atomic_rename else final
        self.fs.pipe_file(tmp, data)
        if self._atomic_rename:
            self.fs.mv(tmp, final)

    def remove(self, prefix: str) -> None:
        """Forget and delete every recorded file under ``prefix``, e.g. a phase's stale outputs."""
        self.remove_files(self.files(prefix))

    def remove_files(self, rels: Iterable[str]) -> None:
        if not self.owner:
            raise RuntimeError("only the store that owns manifest.json removes files")
        doomed = [rel for rel in rels if rel in self.manifest]
        if not doomed:
            return
        with self._lock:
            for rel in doomed:
                del self.manifest[rel]
            self._write_manifest()
        for rel in doomed:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(self.abspath(rel))

    def write_bytes(self, rel: str, data: bytes) -> None:
        with self.writer(rel) as f:
            f.write(data)

    def write_json(self, rel: str, obj: Any) -> None:
        self.write_bytes(rel, json.dumps(obj, indent=2).encode() + b"\n")

    def save_array(self, rel: str, array: np.ndarray) -> None:
        with self.writer(rel, shape=list(array.shape), dtype=array.dtype.str) as f:
            np.lib.format.write_array(f, np.ascontiguousarray(array), allow_pickle=False)

    @contextlib.contextmanager
    def array_writer(self, rel: str, shape: tuple[int, ...], dtype: np.dtype) -> Iterator[RowWriter]:
        """Write a C-ordered array of ``shape`` block by block, for arrays too big to hold."""
        dtype = np.dtype(dtype)
        with self.writer(rel, shape=list(shape), dtype=dtype.str) as f:
            header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
                      "shape": tuple(shape)}
            np.lib.format.write_array_header_1_0(f, header)
            w = RowWriter(f, shape, dtype)
            yield w
            if w.rows != shape[0]:
                raise RuntimeError(f"{rel}: wrote {w.rows} of {shape[0]} rows")

    # ---- reading ---------------------------------------------------------------------------

    def _entry(self, rel: str) -> dict[str, Any]:
        if rel not in self.manifest or not self.fs.exists(self.abspath(rel)):
            raise DldrError(f"{self.abspath(rel)} is missing from the run directory; {self._advice(rel)}")
        return self.manifest[rel]

    def _advice(self, rel: str) -> str:
        writer = _WRITER.get(rel.split("/", 1)[0])
        return f"re-run `{writer}` to write it again" if writer else "re-run the phase that writes it"

    def checksum_algorithm(self, rel: str) -> str:
        """The manifest key of the checksum ``rel`` was recorded with."""
        algorithm = next((key for key in CHECKSUMS if key in self.manifest[rel]), None)
        if algorithm is None:
            raise DldrError(f"manifest.json of {self.url} records no checksum ({' or '.join(CHECKSUMS)}) for {rel}; "
                            f"{self._advice(rel)}")
        return algorithm

    def checksum(self, rel: str) -> str:
        """The recorded checksum of ``rel``: it changes whenever the file's bytes do."""
        return self.manifest[rel][self.checksum_algorithm(rel)]

    def _check(self, rel: str, digest: str) -> None:
        if digest != self.checksum(rel):
            raise DldrError(f"{self.abspath(rel)} is corrupt (its {self.checksum_algorithm(rel)} checksum does not "
                            f"match manifest.json); {self._advice(rel)}")

    def read_bytes(self, rel: str) -> bytes:
        self._entry(rel)
        data = self.fs.cat_file(self.abspath(rel))
        self.bytes_read[rel] += len(data)
        self._check(rel, CHECKSUMS[self.checksum_algorithm(rel)](data).hexdigest())
        return data

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_bytes(rel))

    def load_array(self, rel: str) -> np.ndarray:
        try:
            return np.load(io.BytesIO(self.read_bytes(rel)), allow_pickle=False)
        except ValueError as e:
            raise DldrError(f"{self.abspath(rel)} is not a readable .npy array ({e}); {self._advice(rel)}") from e

    def row_reader(self, rel: str) -> RowReader:
        self._entry(rel)
        return RowReader(self, rel)


def _whole_pages(size: int) -> int:
    """``size`` rounded up to a multiple of ``ALIGN``."""
    return -(-size // ALIGN) * ALIGN


def paged_buffer(count: int, row_bytes: int) -> np.ndarray:
    """Memory for ``paged_rows`` of up to ``count`` rows of up to ``row_bytes``, at any offset."""
    return np.empty(count * _whole_pages(row_bytes + ALIGN) + ALIGN, dtype=np.uint8)


def paged_rows(count: int, row_bytes: int, offset: int,
               raw: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``count`` page-aligned uint8 rows, and in each the ``row_bytes`` that start at ``offset % ALIGN``.

    A ``RowReader`` at file offset ``offset`` reads into such a row past the page cache
    (``read_into(view, page)``): whole pages land at page-aligned addresses, and the data where
    the view expects it. The rows are cut from ``raw`` (a ``paged_buffer``) where given.
    """
    lead = offset % ALIGN
    stride = _whole_pages(lead + row_bytes)
    raw = paged_buffer(count, row_bytes) if raw is None else raw
    if raw.size < count * stride + ALIGN:
        raise ValueError(f"a buffer of {raw.size} bytes cannot hold {count} rows of {row_bytes} bytes")
    first = -raw.ctypes.data % ALIGN
    pages = raw[first:first + count * stride].reshape(count, stride)
    return pages, pages[:, lead:lead + row_bytes]


class RowWriter:
    def __init__(self, f: _HashingFile, shape: tuple[int, ...], dtype: np.dtype):
        self.f, self.shape, self.dtype, self.rows = f, shape, dtype, 0

    def write(self, block: np.ndarray) -> None:
        block = np.ascontiguousarray(block, dtype=self.dtype)
        if block.shape[1:] != tuple(self.shape[1:]):
            raise ValueError(f"block of shape {block.shape} for an array of shape {self.shape}")
        self.f.write(block.tobytes())
        self.rows += block.shape[0]


def _open_direct(path: str) -> int | None:
    """A descriptor that reads ``path`` past the page cache, where the OS and file system allow it."""
    if not hasattr(os, "O_DIRECT"):
        return None
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError:  # e.g. a file system without direct I/O
        return None


def direct_io(path: str) -> bool:
    """Whether ``path`` can be read past the page cache: where ``RowReader`` reads it so."""
    fd = _open_direct(path)
    if fd is not None:
        os.close(fd)
    return fd is not None


class RowReader:
    """Reads a .npy file front to back in row blocks, checking its checksum on the way.

    Local files can be read past the page cache (``read_into`` with a page): the snapshots are
    read once, and on the machines measured the kernel spent more CPU filling and copying its
    cache than the phase computes (benchmarks/README.md, basis).
    """

    def __init__(self, store: RunStore, rel: str):
        self.store, self.rel = store, rel
        self._raw = store.fs.open(store.abspath(rel), "rb")
        self._direct = _open_direct(store.abspath(rel)) if store._atomic_rename else None
        with contextlib.suppress(AttributeError, OSError, io.UnsupportedOperation):
            # local files: the kernel reads further ahead, which matters when many files are read in turn
            os.posix_fadvise(self._raw.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
        self._f = _HashingFile(self._raw, store.checksum_algorithm(rel))
        try:
            version = np.lib.format.read_magic(self._f)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read_header(self._f)
        except ValueError as e:
            self.close()
            raise DldrError(f"{store.abspath(rel)} is not a readable .npy array ({e}); "
                            f"{store._advice(rel)}") from e
        if fortran or dtype.hasobject:
            self.close()
            raise DldrError(f"{store.abspath(rel)} is not a plain C-ordered numeric array; "
                            f"{store._advice(rel)}")
        self.shape, self.dtype = tuple(shape), dtype
        self._row_bytes = dtype.itemsize * int(np.prod(self.shape[1:], dtype=np.int64))
        self._data_start = self._raw.tell()
        self.rows_read = 0
        self.direct_bytes = 0  # of the bytes read, those read past the page cache

    @property
    def offset(self) -> int:
        """The file offset of the next row."""
        return self._data_start + self.rows_read * self._row_bytes

    def read(self, rows: int) -> np.ndarray:
        rows = min(rows, self.shape[0] - self.rows_read)
        data = self._f.read(rows * self._row_bytes)
        if len(data) != rows * self._row_bytes:
            self.close()
            raise DldrError(f"{self.store.abspath(self.rel)} is truncated; {self.store._advice(self.rel)}")
        self.rows_read += rows
        self.store.bytes_read[self.rel] += len(data)
        return np.frombuffer(data, dtype=self.dtype).reshape((rows, *self.shape[1:]))

    def read_into(self, out: np.ndarray, page: np.ndarray | None = None) -> Callable[[], None]:
        """Fill ``out`` with the next ``len(out)`` rows, without a copy.

        ``page``: a row of ``paged_rows`` whose view is ``out``; its bytes around ``out`` may be
        overwritten, and a local file is then read past the page cache. The checksum is not
        updated here: the returned function feeds these rows to it, and the caller runs it (in
        read order, before ``finish``) where it suits, e.g. on another thread.
        """
        if out.dtype != self.dtype or len(out) > self.shape[0] - self.rows_read:
            raise ValueError(f"{self.rel}: cannot read {out.shape} {out.dtype} at row {self.rows_read}")
        view = memoryview(out.reshape(-1).view(np.uint8))
        if page is not None and self._read_direct(view, page):
            self._raw.seek(self.offset + len(view))  # where the cached reads of ``read`` and ``finish`` go on
        else:
            filled = 0
            while filled < len(view) and (n := self._raw.readinto(view[filled:])):
                filled += n
            if filled != len(view):
                self.close()
                raise DldrError(f"{self.store.abspath(self.rel)} is truncated; {self.store._advice(self.rel)}")
        self.rows_read += len(out)
        self.store.bytes_read[self.rel] += len(view)
        return functools.partial(self._f.hash.update, view)

    def _read_direct(self, view: memoryview, page: np.ndarray) -> bool:
        """Read ``view``'s bytes with O_DIRECT, whole pages into ``page``; False where that cannot be done."""
        lead = self.offset % ALIGN
        start = np.frombuffer(view, dtype=np.uint8).ctypes.data - page.ctypes.data
        if self._direct is None or page.ctypes.data % ALIGN or start != lead or len(page) < lead + len(view):
            return False
        end = min(len(page), _whole_pages(lead + len(view)))
        target, filled = memoryview(page)[:end], 0
        try:
            while filled < lead + len(view) and (n := os.preadv(self._direct, [target[filled:]],
                                                                 self.offset - lead + filled)):
                filled += n
        except OSError:  # the file system refused this read: read it, and the rest of the file, through the cache
            os.close(self._direct)
            self._direct = None
            return False
        if filled < lead + len(view):
            return False  # truncated: the cached read says so
        self.direct_bytes += len(view)
        return True

    def skip(self, rows: int) -> None:
        """Pass over ``rows`` rows without keeping them (they still count for the checksum)."""
        while rows > 0:
            step = min(rows, max(1, (1 << 20) // max(self._row_bytes, 1)))
            self.read(step)
            rows -= step

    def finish(self) -> None:
        """Read what is left and verify the checksum of the whole file."""
        self.skip(self.shape[0] - self.rows_read)
        while self._f.read(1 << 20):
            pass
        self.close()
        self.store._check(self.rel, self._f.hash.hexdigest())

    def close(self) -> None:
        self._raw.close()
        if self._direct is not None:
            os.close(self._direct)
            self._direct = None


class BackgroundWriter:
    """Saves arrays on a background thread, so a training step never waits on storage.

    At most ``max_pending`` arrays wait at once (``submit`` blocks beyond that), which bounds
    the memory the copies take. ``flush`` waits for everything and re-raises a failed write.
    """

    def __init__(self, store: RunStore, max_pending: int = 2):
        self.store = store
        self.max_pending = max_pending
        self.largest_bytes = 0
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dldr-writer")
        self._pending: list[Future] = []

    def submit(self, rel: str, array: np.ndarray) -> None:
        while len(self._pending) >= self.max_pending:
            self._pending.pop(0).result()
        self.largest_bytes = max(self.largest_bytes, array.nbytes)
        self._pending.append(self._pool.submit(self.store.save_array, rel, array))

    def flush(self) -> None:
        pending, self._pending = self._pending, []
        for future in pending:
            future.result()

    def __enter__(self) -> BackgroundWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if exc[0] is None:
                self.flush()
        finally:
            self._pool.shutdown(wait=True)
