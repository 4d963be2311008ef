"""The run directory: files over fsspec, each written whole and recorded with its checksum.

A file is written to a temporary name and renamed into place (on object stores, where a put is
already atomic, it is written under its final name), and only then recorded in
``manifest.json``, which is itself replaced atomically. Readers check the recorded checksum and
name the file when it does not match, so a torn or corrupted file is never used silently.
Arrays are .npy files read with ``allow_pickle=False``; large ones can be read in row blocks so
no process needs a whole snapshot matrix in memory.

The checksum is XXH3-128: it guards against torn and corrupted files (an adversary who can
change a file can change manifest.json too), and phase 2 checks every snapshot byte, where
sha256 cost as much CPU as the read itself (benchmarks/README.md, basis).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import io
import json
import os
import posixpath
import re
import socket
import stat
import threading
import time
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
CHECKSUMS: dict[str, Callable[[], Any]] = {"xxh3_128": xxhash.xxh3_128}
CHECKSUM = next(iter(CHECKSUMS))
# O_DIRECT reads need offsets, lengths and buffer addresses in multiples of the device's logical
# block size; a page is a multiple of every common one.
ALIGN = 4096

# Which command writes the files under each top-level folder, for "re-run X" advice.
_WRITER = {
    "snapshots": "dldr sample",
    "basis": "dldr basis",
    "data": "dldr sample",
    "subspace": "dldr basis",
    "metrics.jsonl": "dldr sample",
    "summary.json": "dldr sample",
}
# What dldr writes into a run directory: a file there that the manifest does not list (a crash
# came between its rename and its record) is a leftover, and so is any temporary file.
TENSORBOARD = "tensorboard"  # the folder of --tracker tensorboard's event files
OWN_FOLDERS = ("snapshots/", "basis/", "subspace/", "plots/", "data/", f"{TENSORBOARD}/")
OWN_FILES = ("config.yaml", "metrics.jsonl", "summary.json", "model.safetensors")
TMP_MARK = ".tmp-"
LOCK = ".dldr.lock"
# An object store's lock is refreshed this often; one not refreshed for STALE_LOCK_S is reported as stale.
HEARTBEAT_S = 30.0
STALE_LOCK_S = 120.0

CONFIG = "config.yaml"  # the run's resolved configuration: a run directory is one that holds it


def holds_run(url: str) -> bool:
    return RunStore(url).exists(CONFIG)


def open_fs(url: str) -> tuple[Any, str]:
    """The fsspec file system and root path of ``url``; a scheme fsspec cannot serve is one line.

    An object store's file system comes wrapped so that its failures are one line (``_Guarded``).
    """
    try:
        fs, root = fsspec.core.url_to_fs(url)
    except ImportError as e:
        raise DldrError(
            f"--run-dir {url} needs a package that is not installed ({e}); install it "
            '(s3://: pip install "dldr[s3]"), or use a local path'
        ) from None
    except ValueError as e:
        raise DldrError(f"--run-dir {url}: {e}; use a local path or an fsspec URL such as s3://bucket/run") from None
    return (fs, root) if isinstance(fs, LocalFileSystem) else (_Guarded(fs, url), root)


@functools.cache
def _client_errors() -> tuple[type[BaseException], ...]:
    """What an object store's client raises when the store fails: OSError (s3fs turns S3's answers
    into those) and botocore's own errors, which are not OSErrors (an endpoint that does not answer)."""
    try:
        from botocore.exceptions import BotoCoreError
    except ImportError:
        return (OSError,)
    return (OSError, BotoCoreError)


class _Guarded:
    """An object store's file system, and the files it opens, whose failures end in one line that
    names the run directory. FileNotFoundError, FileExistsError and io.UnsupportedOperation pass as
    they are: the store asks those questions on purpose (is the manifest there, is the lock taken,
    does the file have a descriptor)."""

    def __init__(self, target: Any, url: str):
        self._target, self._url = target, url

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._target, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            with self._translated():
                result = attr(*args, **kwargs)
            return _Guarded(result, self._url) if isinstance(result, io.IOBase) else result

        return call

    def __enter__(self) -> _Guarded:
        return self

    def __exit__(self, *exc: object) -> None:
        with self._translated():  # closing a file written to an object store uploads its last part
            self._target.__exit__(*exc)

    @contextlib.contextmanager
    def _translated(self) -> Iterator[None]:
        try:
            yield
        except (FileNotFoundError, FileExistsError, io.UnsupportedOperation):
            raise
        except _client_errors() as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DldrError(
                f"the object store of {self._url} failed ({reason}); check its endpoint "
                "(AWS_ENDPOINT_URL), the credentials and the network, then run the command again "
                "(the files completed so far are kept)"
            ) from None


def confine(rel: Any, where: str) -> str:
    """``rel`` if it is a normalised relative path inside the run directory; else one line that says so.

    Names come from manifest.json and a job's metadata, which anyone with the run directory can
    edit: ``basis/../../victim`` must never reach a delete or a write.
    """
    if (
        not isinstance(rel, str)
        or not rel
        or "\\" in rel
        or "\0" in rel
        or rel.startswith("/")
        or posixpath.normpath(rel) != rel
        or rel == ".."
        or rel.startswith("../")
    ):
        raise DldrError(
            f"{where} names {rel!r}, which is not a path inside the run directory; the run directory "
            "was altered: restore it from a copy, or start a new run with `dldr fit`"
        )
    return rel


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

    def tell(self) -> int:
        """The bytes passed so far: the position in a file read or written from its start."""
        return self.size


class RunStore:
    """A run directory at a local path or any fsspec URL (``memory://run``, ``s3://bucket/run``).

    One process owns ``manifest.json``. Other processes writing into the same run (the ranks
    of a distributed phase) open it with ``owner=False``: their files are written
    the same way, but their manifest entries collect in ``journal`` for the owner to
    ``record``, so the manifest never has two writers. Commands that write hold ``lock``.

    Every name in manifest.json must lie inside the run directory, every file read must be a
    regular file of the recorded size, and on local file systems every file, the manifest and
    their folders are fsynced, so a power loss leaves the manifest and what it lists intact.
    A file that replaces a recorded one is first recorded as pending, with both checksums: a
    crash between its rename and its record leaves a file the manifest accepts.
    """

    def __init__(self, url: str, owner: bool = True):
        self.url = url
        self.owner = owner
        self.fs, self.root = open_fs(url)
        self.local = isinstance(self.fs, LocalFileSystem)
        self._lock = threading.Lock()
        self.manifest: dict[str, dict[str, Any]] = {}
        self.journal: dict[str, dict[str, Any]] = {}
        # bytes this process read from each file: what the memory tests of sharding check
        self.bytes_read: Counter[str] = Counter()
        self.reload()

    def reload(self) -> None:
        """Read manifest.json again, after another process (the ranks of a phase) updated it."""
        self.manifest = {}
        path = self.abspath(MANIFEST)
        if not self.fs.exists(path):
            return
        where = f"manifest.json of {self.url}"
        try:
            with self._open_path(path, MANIFEST) as f:
                files = json.loads(f.read())["files"]
            if not isinstance(files, dict):
                raise TypeError("its files are not a mapping")
            for rel, entry in files.items():
                confine(rel, where)
                _check_entry(entry)
        except (ValueError, KeyError, TypeError) as e:  # JSON and Unicode errors are ValueErrors
            reason = f"no {e}" if isinstance(e, KeyError) else str(e).splitlines()[0] or type(e).__name__
            raise DldrError(
                f"{where} is damaged ({reason}); restore the run directory from a copy, "
                "or start a new run with `dldr fit`"
            ) from None
        self.manifest = files

    @property
    def location(self) -> str:
        """The run's address as other processes must open it: local paths made absolute."""
        return self.root if self.local else self.url

    def abspath(self, rel: str) -> str:
        return posixpath.join(self.root, confine(rel, f"a path of {self.url}"))

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
            raise DldrError(
                f"{self.url} has snapshot folders {sorted(by_shard)}, expected {expected}; re-run `dldr sample`"
            )
        steps = [[posixpath.basename(rel) for rel in by_shard[name]] for name in expected]
        if any(s != steps[0] for s in steps):
            raise DldrError(f"the snapshot shards of {self.url} hold different steps; re-run `dldr sample`")
        for rels in by_shard.values():
            for rel in rels:
                shape = self.manifest[rel].get("shape")
                if not shape or len(shape) != 1:
                    raise DldrError(
                        f"manifest.json of {self.url} records the shape {shape} for {rel}, not that of a "
                        "snapshot; re-run `dldr sample`"
                    )
        return [by_shard[name] for name in expected]

    # ---- writing ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def writer(self, rel: str, **meta: Any) -> Iterator[_HashingFile]:
        """Yield a file to write ``rel`` into; it appears and enters the manifest only on success."""
        final = self.abspath(rel)
        tmp = f"{final}{TMP_MARK}{uuid.uuid4().hex[:8]}" if self.local else final
        previous = self.manifest.get(rel) if self.owner else None
        try:
            self._makedirs(posixpath.dirname(final))
            with open(tmp, "wb") if self.local else self.fs.open(tmp, "wb") as raw:
                f = _HashingFile(raw)
                yield f
                entry = {CHECKSUM: f.hash.hexdigest(), "bytes": f.size, **meta}
                if self.local:
                    raw.flush()
                    os.fsync(raw.fileno())
                if previous is not None:  # pending until the new file is in place: either one is valid
                    self._record(rel, {**entry, PENDING: _settled(previous)})
            if self.local:
                os.replace(tmp, final)
                _fsync_dir(posixpath.dirname(final))
        except OSError as e:
            self._discard(tmp)
            raise DldrError(f"cannot write {final}: {e.strerror or e}; {_write_advice(e)}") from e
        except BaseException:
            self._discard(tmp)
            raise
        try:
            self._record(rel, entry)
        except BaseException:
            if previous is None:  # not listed, so not kept: the run stays as it was
                self._discard(final)
            raise

    def _makedirs(self, path: str) -> None:
        if not self.local:
            self.fs.makedirs(path, exist_ok=True)
            return
        missing = _missing_folders(path)
        if missing:
            os.makedirs(missing[0], exist_ok=True)
            for created in reversed(missing):  # a new folder is durable once its parent's entry is
                _fsync_dir(os.path.dirname(created))

    def _discard(self, path: str) -> None:
        with contextlib.suppress(OSError):
            if self.local and os.path.lexists(path):
                os.remove(path)

    def _record(self, rel: str, entry: dict[str, Any]) -> None:
        if not self.owner:
            with self._lock:
                self.manifest[rel] = entry
                self.journal[rel] = entry
            return
        with self._changing():
            self.manifest[rel] = entry

    @contextlib.contextmanager
    def _changing(self) -> Iterator[None]:
        """Change the manifest in the block, then write it; a failed write leaves it as it was."""
        with self._lock:
            before = dict(self.manifest)
            try:
                yield
                self._write_manifest()
            except BaseException:
                self.manifest = before
                raise

    def take_journal(self) -> dict[str, dict[str, Any]]:
        """The entries of the files written since the last call, for the owner to record."""
        with self._lock:
            taken, self.journal = self.journal, {}
        return taken

    def record(self, entries: dict[str, dict[str, Any]]) -> None:
        """Add the entries of files other processes wrote, with one manifest write."""
        if not self.owner:
            raise RuntimeError("only the store that owns manifest.json records entries")
        if not entries:
            return
        for rel, entry in entries.items():
            confine(rel, "a worker's journal")
            _check_entry(entry)
        with self._changing():
            self.manifest.update(entries)

    def _write_manifest(self) -> None:
        data = json.dumps({"files": self.manifest}, indent=1, sort_keys=True).encode()
        final = self.abspath(MANIFEST)
        try:
            if not self.local:
                self.fs.pipe_file(final, data)
                return
            tmp = f"{final}{TMP_MARK}{uuid.uuid4().hex[:8]}"
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, final)
            except BaseException:
                self._discard(tmp)
                raise
            _fsync_dir(self.root)
        except OSError as e:
            raise DldrError(f"cannot write {final}: {e.strerror or e}; {_write_advice(e)}") from None

    def remove(self, prefix: str) -> None:
        """Forget and delete every recorded file under ``prefix``, e.g. a phase's stale outputs."""
        self.remove_files(self.files(prefix))

    def remove_files(self, rels: Iterable[str]) -> None:
        if not self.owner:
            raise RuntimeError("only the store that owns manifest.json removes files")
        doomed = [rel for rel in rels if rel in self.manifest]
        if not doomed:
            return
        with self._changing():
            for rel in doomed:
                del self.manifest[rel]
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

    # ---- the run directory as a whole -------------------------------------------------------

    def sweep(self) -> list[str]:
        """Tidy what a stopped command left, and return the names of the files removed.

        Temporary files and files in dldr's own folders that the manifest does not list are
        removed; an entry left pending by a crash between a rename and its record is settled
        to the file that is in place. Runs under ``lock``, before a command writes.
        """
        if not self.owner or not self.local or not os.path.isdir(self.root):
            return []
        removed = []
        candidates = [name for name in os.listdir(self.root) if name.startswith((*OWN_FILES, MANIFEST))]
        for folder in OWN_FOLDERS:
            for dirpath, _, filenames in os.walk(os.path.join(self.root, folder)):  # symlinks are not followed
                candidates += [os.path.relpath(os.path.join(dirpath, name), self.root) for name in filenames]
        for rel in sorted(candidates):
            rel = rel.replace(os.sep, "/")
            if rel not in self.manifest and rel != MANIFEST and os.path.lexists(self.abspath(rel)):
                self._discard(self.abspath(rel))
                removed.append(rel)
        settled = False
        for rel, entry in list(self.manifest.items()):
            if PENDING in entry:
                with contextlib.suppress(DldrError):
                    data = self.read_bytes(rel)
                    algorithm = self.checksum_algorithm(rel)
                    digest = CHECKSUMS[algorithm](data).hexdigest()
                    self.manifest[rel] = next(
                        e for e in (_settled(entry), entry[PENDING]) if e.get(algorithm) == digest
                    )
                    settled = True
        if settled:
            with self._lock:
                self._write_manifest()
        return removed

    @contextlib.contextmanager
    def lock(self, command: str) -> Iterator[None]:
        """Hold the run directory for ``command``; another command on it is refused with one line.

        Local paths: an OS lock (flock) on .dldr.lock, which the OS releases when the process
        ends, so it is never stale. Object stores: a .dldr.lock object created exclusively,
        with its holder and a heartbeat; one whose holder died stays until it is deleted, and
        the refusal says how old its heartbeat is.
        """
        holder = {
            "command": command,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        if self.local:
            with _flock(self.root, holder, self.url):
                yield
        else:
            with _object_lock(self, holder):
                yield

    # ---- reading ---------------------------------------------------------------------------

    def _entry(self, rel: str) -> dict[str, Any]:
        if rel not in self.manifest or not (self.local or self.fs.exists(self.abspath(rel))):
            raise DldrError(f"{self.abspath(rel)} is missing from the run directory; {self._advice(rel)}")
        return self.manifest[rel]

    def _advice(self, rel: str) -> str:
        writer = _WRITER.get(rel.split("/", 1)[0])
        if writer:
            return f"re-run `{writer}` to write it again"
        return "restore the run directory from a copy, or start a new run with `dldr fit`"

    def _open(self, rel: str) -> BinaryIO:
        """``rel`` opened for reading, refused unless it is a regular file of a recorded size."""
        entry = self._entry(rel)
        sizes = {e["bytes"] for e in (entry, entry.get(PENDING, {})) if "bytes" in e}
        return self._open_path(self.abspath(rel), rel, sizes)

    def _open_path(self, path: str, rel: str, sizes: set | None = None) -> BinaryIO:
        if not self.local:
            return self.fs.open(path, "rb")
        try:  # O_NONBLOCK: opening a FIFO must not wait for a writer
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
        except OSError as e:
            what = {errno.ELOOP: "is a symbolic link", errno.ENOENT: "is missing from the run directory"}
            raise DldrError(
                f"{path} {what.get(e.errno, f'cannot be read ({e.strerror})')}; {self._advice(rel)}"
            ) from None
        info = os.fstat(fd)
        problem = None
        if not stat.S_ISREG(info.st_mode):
            problem = "is not a regular file (a FIFO, device or folder)"
        elif sizes and info.st_size not in sizes:
            problem = f"is corrupt ({info.st_size} bytes, manifest.json records {' or '.join(map(str, sizes))})"
        if problem:
            os.close(fd)
            raise DldrError(f"{path} {problem}; {self._advice(rel)}")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")

    def checksum_algorithm(self, rel: str) -> str:
        """The manifest key of the checksum ``rel`` was recorded with."""
        algorithm = next((key for key in CHECKSUMS if key in self.manifest[rel]), None)
        if algorithm is None:
            raise DldrError(
                f"manifest.json of {self.url} records no checksum ({' or '.join(CHECKSUMS)}) for {rel}; "
                f"{self._advice(rel)}"
            )
        return algorithm

    def checksum(self, rel: str) -> str:
        """The recorded checksum of ``rel``: it changes whenever the file's bytes do."""
        return self.manifest[rel][self.checksum_algorithm(rel)]

    def _check(self, rel: str, digest: str) -> None:
        algorithm = self.checksum_algorithm(rel)
        if digest not in (self.checksum(rel), self.manifest[rel].get(PENDING, {}).get(algorithm)):
            raise DldrError(
                f"{self.abspath(rel)} is corrupt (its {algorithm} checksum does not "
                f"match manifest.json); {self._advice(rel)}"
            )

    def read_bytes(self, rel: str) -> bytes:
        with self._open(rel) as f:
            data = f.read()
        self.bytes_read[rel] += len(data)
        self._check(rel, CHECKSUMS[self.checksum_algorithm(rel)](data).hexdigest())
        return data

    def read_json(self, rel: str) -> Any:
        try:
            return json.loads(self.read_bytes(rel))
        except ValueError as e:
            raise DldrError(f"{self.abspath(rel)} is not valid JSON ({e}); {self._advice(rel)}") from None

    def load_array(self, rel: str) -> np.ndarray:
        """A whole .npy file, its header checked against its size before anything is allocated."""
        f = io.BytesIO(self.read_bytes(rel))
        shape, dtype = _array_header(f, len(f.getbuffer()), self.abspath(rel), self._advice(rel))
        return np.frombuffer(f.getbuffer(), dtype=dtype, offset=f.tell()).reshape(shape).copy()

    def row_reader(self, rel: str) -> RowReader:
        return RowReader(self, rel)


PENDING = "replaces"  # a pending entry's record of the file it replaces


def _settled(entry: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in entry.items() if k != PENDING}


def _check_entry(entry: Any) -> None:
    """A manifest entry's fields that readers rely on, each of the right type."""
    if not isinstance(entry, dict):
        raise TypeError(f"an entry is {type(entry).__name__}, not a mapping")
    for candidate in (entry, entry.get(PENDING, {})):
        if not isinstance(candidate, dict):
            raise TypeError("a pending entry is not a mapping")
        size, shape = candidate.get("bytes", 0), candidate.get("shape", [])
        if not (type(size) is int and size >= 0):
            raise TypeError(f"a size is {size!r}")
        if not (isinstance(shape, list) and all(type(n) is int and n >= 0 for n in shape)):
            raise TypeError(f"a shape is {shape!r}")
        if not all(isinstance(candidate.get(k, ""), str) for k in CHECKSUMS):
            raise TypeError("a checksum is not a string")


def _write_advice(e: OSError) -> str:
    if e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return "free space there (or choose another --run-dir) and run the command again"
    return "choose a writable --run-dir"


def _missing_folders(path: str) -> list[str]:
    """``path`` and those of its parents that do not exist, deepest first."""
    missing = []
    while not os.path.isdir(path) and os.path.dirname(path) != path:
        missing.append(path)
        path = os.path.dirname(path)
    return missing


def _fsync_dir(path: str) -> None:
    """Make the entries of folder ``path`` (a rename, a new file) durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as e:  # some file systems cannot fsync a folder; their renames are as durable as they get
        if e.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def _describe(holder: dict[str, Any]) -> str:
    return (
        f"`{holder.get('command', 'dldr')}` (pid {holder.get('pid', '?')} on {holder.get('host', '?')}, "
        f"since {holder.get('since', '?')})"
    )


@contextlib.contextmanager
def _flock(root: str, holder: dict[str, Any], url: str) -> Iterator[None]:
    import fcntl

    created = _missing_folders(root)  # made for the lock, removed again if nothing else went into them
    with contextlib.suppress(OSError):  # os.open says why, below
        os.makedirs(root, exist_ok=True)
    path = os.path.join(root, LOCK)
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except OSError as e:
            raise DldrError(f"cannot lock {url} ({path}: {e.strerror}); {_write_advice(e)}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            with os.fdopen(fd, "rb") as f:
                text = f.read(4096)
            try:
                other = _describe(json.loads(text))
            except ValueError:
                other = "another dldr command"
            raise DldrError(
                f"{url} is in use by {other}; wait for it to end (or stop it), then run this again"
            ) from None
        with contextlib.suppress(FileNotFoundError):
            if os.fstat(fd).st_ino == os.stat(path, follow_symlinks=False).st_ino:
                break  # else the holder before us removed the file as we opened it: take the new one
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)  # before the OS lock goes, so no one else holds a file we remove
        os.close(fd)
        for folder in created:
            with contextlib.suppress(OSError):
                os.rmdir(folder)


@contextlib.contextmanager
def _object_lock(store: RunStore, holder: dict[str, Any]) -> Iterator[None]:
    path = posixpath.join(store.root, LOCK)

    def stamp() -> bytes:
        return json.dumps({**holder, "heartbeat": time.time()}).encode()

    try:
        store.fs.makedirs(store.root, exist_ok=True)
        try:
            with store.fs.open(path, "xb") as f:  # exclusive: fails if the object exists
                f.write(stamp())
        except (ValueError, NotImplementedError):  # a file system without exclusive creation: check, then write
            if store.fs.exists(path):
                raise FileExistsError(path) from None
            store.fs.pipe_file(path, stamp())
    except FileExistsError:
        try:
            other = json.loads(store.fs.cat_file(path))
            age = time.time() - float(other["heartbeat"])
        except (DldrError, OSError, ValueError, KeyError, TypeError):
            other, age = {}, float("inf")
        stale = "; its holder is likely gone" if age > STALE_LOCK_S else ""
        raise DldrError(
            f"{store.url} is in use by {_describe(other)} (last heartbeat {age:.0f} s ago{stale}); "
            "wait for it to end, "
            f"or, if that process is gone, delete {store.url}/{LOCK} and run this again"
        ) from None
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(HEARTBEAT_S):
            with contextlib.suppress(DldrError):  # a missed beat: the next one may reach the store
                store.fs.pipe_file(path, stamp())

    thread = threading.Thread(target=beat, daemon=True, name="dldr-lock-heartbeat")
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        with contextlib.suppress(DldrError, FileNotFoundError):  # the error that ends the command says more
            store.fs.rm(path)


# The header numpy writes for a plain array: its dict's repr, padded with spaces to a line ending
_NPY_HEADER = re.compile(
    r"\{'descr': '([<>|=]?[a-zA-Z]\d*)', 'fortran_order': (True|False), "
    r"'shape': \(((?:\d+, )*\d+,?|)\), \} *\n"
)


def _parse_header(f: BinaryIO) -> tuple[tuple[int, ...], bool, np.dtype]:
    """The shape, order and dtype a .npy header names, read without ``ast`` (numpy's reader
    literal_evals it, which CPython 3.11 can fail when another thread parses code at the same time)."""
    magic = f.read(8)
    if len(magic) != 8 or magic[:6] != b"\x93NUMPY" or magic[6] not in (1, 2, 3):
        raise ValueError("no .npy magic number")
    width = 2 if magic[6] == 1 else 4
    length = int.from_bytes(f.read(width), "little")
    text = f.read(length)
    match = _NPY_HEADER.fullmatch(text.decode("latin1" if magic[6] < 3 else "utf8")) if len(text) == length else None
    if match is None:
        raise ValueError("its header is not that of a plain array")
    shape = tuple(int(n) for n in match[3].replace(",", " ").split())
    return shape, match[2] == "True", np.dtype(match[1])


def _array_header(f: BinaryIO, size: int, path: str, advice: str) -> tuple[tuple[int, ...], np.dtype]:
    """The shape and dtype of the .npy file ``f`` of ``size`` bytes, read up to its data; a header
    that is not a plain numeric array, or that claims more (or fewer) bytes than the file holds, is refused."""
    try:
        shape, fortran, dtype = _parse_header(f)
    except (ValueError, TypeError, EOFError) as e:
        raise DldrError(f"{path} is not a readable .npy array ({e}); {advice}") from None
    if fortran or dtype.hasobject or dtype.itemsize == 0:
        raise DldrError(f"{path} is not a plain C-ordered numeric array; {advice}")
    if int(np.prod(shape, dtype=object)) * dtype.itemsize != size - f.tell():
        raise DldrError(
            f"{path}'s header claims a {dtype} array of shape {shape}, which its "
            f"{size - f.tell()} bytes of data do not hold; {advice}"
        )
    return tuple(shape), dtype


def _whole_pages(size: int) -> int:
    """``size`` rounded up to a multiple of ``ALIGN``."""
    return -(-size // ALIGN) * ALIGN


def paged_buffer(count: int, row_bytes: int) -> np.ndarray:
    """Memory for ``paged_rows`` of up to ``count`` rows of up to ``row_bytes``, at any offset."""
    return np.empty(count * _whole_pages(row_bytes + ALIGN) + ALIGN, dtype=np.uint8)


def paged_rows(count: int, row_bytes: int, offset: int, raw: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
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
    pages = raw[first : first + count * stride].reshape(count, stride)
    return pages, pages[:, lead : lead + row_bytes]


def _open_direct(path: str) -> int | None:
    """A descriptor that reads ``path`` past the page cache, where the OS and file system allow it."""
    if not hasattr(os, "O_DIRECT"):
        return None
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
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
        self._raw = store._open(rel)
        self._direct = _open_direct(store.abspath(rel)) if store.local else None
        with contextlib.suppress(AttributeError, OSError, io.UnsupportedOperation):
            # local files: the kernel reads further ahead, which matters when many files are read in turn
            os.posix_fadvise(self._raw.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
        self._f = _HashingFile(self._raw, store.checksum_algorithm(rel))
        try:
            size = os.fstat(self._raw.fileno()).st_size if store.local else store.fs.size(store.abspath(rel))
            shape, dtype = _array_header(self._f, size, store.abspath(rel), store._advice(rel))
            if not shape:
                raise DldrError(f"{store.abspath(rel)} holds a scalar, not rows; {store._advice(rel)}")
        except BaseException:
            self.close()
            raise
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
            while filled < lead + len(view) and (
                n := os.preadv(self._direct, [target[filled:]], self.offset - lead + filled)
            ):
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
        self.peak_bytes = 0  # the most bytes of arrays waiting or being written at once
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dldr-writer")
        self._pending: list[tuple[Future, int]] = []

    def submit(self, rel: str, array: np.ndarray) -> None:
        while len(self._pending) >= self.max_pending:
            self._pending.pop(0)[0].result()
        held = array.nbytes + sum(n for future, n in self._pending if not future.done())
        self.peak_bytes = max(self.peak_bytes, held)
        self._pending.append((self._pool.submit(self.store.save_array, rel, array), array.nbytes))

    def flush(self) -> None:
        pending, self._pending = self._pending, []
        for future, _ in pending:
            future.result()

    def __enter__(self) -> BackgroundWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if exc[0] is None:
                self.flush()
        finally:
            self._pool.shutdown(wait=True)
