"""Hostile and faulty input: every case ends in one line that says what to do, a non-zero exit, and a run
directory byte for byte as it was (or, for a new run, no run directory at all).

``CASES`` and ``SCENARIOS`` are also the table of bad input in docs/run-directory.md, which the README links
(``test_the_readme_table_is_this_suite``): it cannot list a case this suite does not show.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
import xxhash

from dldr import store as store_module
from dldr.cli import main
from dldr.errors import DldrError
from dldr.store import LOCK, RunStore
from tests.helpers import SMALL, stderr_lines

SNAPSHOT = "snapshots/shard-00000-of-00001/step-000017.npy"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A run through all three phases, copied by each test that damages one."""
    run_dir = tmp_path_factory.mktemp("faults") / "finished"
    assert main(["fit", "--run-dir", str(run_dir), *SMALL]) == 0
    return run_dir


def tree(root: Path) -> dict[str, bytes | str]:
    """Every entry under ``root``: file bytes, or what a non-file is. Equal trees: a byte-identical run."""
    found: dict[str, bytes | str] = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            found[rel] = f"link to {os.readlink(path)}"
        elif path.is_fifo():
            found[rel] = "fifo"
        elif path.is_file():
            found[rel] = path.read_bytes()
    return found


def error_line(capsys) -> str:
    err = stderr_lines(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith("dldr: error: "), err
    return err[0]


# ---- ways to damage a run directory -------------------------------------------------------------------


def manifest(run: Path) -> dict:
    return json.loads((run / "manifest.json").read_text())


def rewrite_manifest(run: Path, change: Callable[[dict], object]) -> None:
    data = manifest(run)
    change(data["files"])
    (run / "manifest.json").write_text(json.dumps(data))


def tamper(rel: str, data: bytes | Callable[[bytes], bytes]) -> Callable[[Path], None]:
    """Replace ``rel`` and its manifest entry together, as someone editing the run directory would: the
    checksum then holds, and what is inside must be checked for itself."""

    def damage(run: Path) -> None:
        path = run / rel
        new = data(path.read_bytes()) if callable(data) else data
        path.write_bytes(new)
        rewrite_manifest(
            run, lambda files: files[rel].update(xxh3_128=xxhash.xxh3_128(new).hexdigest(), bytes=len(new))
        )

    return damage


def escaping_key(key: str) -> Callable[[Path], None]:
    """A manifest entry whose name leads out of the run directory, onto a sentinel file."""

    def damage(run: Path) -> None:
        rewrite_manifest(run, lambda files: files.update({key: {"xxh3_128": "0" * 32, "bytes": 8}}))

    return damage


def raw_manifest(text: bytes) -> Callable[[Path], None]:
    return lambda run: (run / "manifest.json").write_bytes(text)


def torn_manifest(run: Path) -> None:
    data = (run / "manifest.json").read_bytes()
    (run / "manifest.json").write_bytes(data[: len(data) // 2])


def flip_byte(run: Path) -> None:
    raw = bytearray((run / SNAPSHOT).read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (run / SNAPSHOT).write_bytes(bytes(raw))


def symlinked(run: Path) -> None:
    (run / SNAPSHOT).unlink()
    (run / SNAPSHOT).symlink_to(run / "snapshots/shard-00000-of-00001/step-000016.npy")


def nan_snapshot(data: bytes) -> bytes:
    raw = bytearray(data)
    raw[-4:] = np.float32(np.nan).tobytes()
    return bytes(raw)


def absurd_header(data: bytes) -> bytes:
    """The header's shape made 10^7 times larger, its padding shortened to keep its length."""
    grown = data.replace(b"(85002,)", b"(850020000000,)", 1)
    end = grown.index(b"\n")
    assert grown[end - 7 : end] == b" " * 7
    return grown[: end - 7] + grown[end:]


def summary_without(*phases: str) -> Callable[[Path], None]:
    def damage(run: Path) -> None:
        summary = json.loads((run / "summary.json").read_text())
        for phase in phases:
            summary["phases"].pop(phase)
        tamper("summary.json", json.dumps(summary).encode())(run)

    return damage


def both(*damages: Callable[[Path], None]) -> Callable[[Path], None]:
    def damage(run: Path) -> None:
        for d in damages:
            d(run)

    return damage


def saved_state_without_keys(run: Path) -> None:
    import io

    buffer = io.BytesIO()
    torch.save({"epoch": 1}, buffer)
    rel = "subspace/state.pt"
    (run / rel).write_bytes(buffer.getvalue())
    rewrite_manifest(
        run,
        lambda files: files.update(
            {rel: {"xxh3_128": xxhash.xxh3_128(buffer.getvalue()).hexdigest(), "bytes": len(buffer.getvalue())}}
        ),
    )
    summary_without("train")(run)


def config_file(text: bytes) -> Callable[[Path], None]:
    """A --config file beside the run: ``{config}`` in the command names it."""
    return lambda root: (root / "config-file.yaml").write_bytes(text)


def cifar_asking_for(shape: tuple[int, ...]) -> Callable[[Path], None]:
    """A CIFAR folder whose first batch's pickle asks numpy for an array of ``shape`` (931 GiB)."""

    def damage(root: Path) -> None:
        from tests.helpers import write_cifar

        write_cifar(root / "cifar")
        small = np.zeros(4, dtype=np.uint8)

        class Huge:
            def __reduce__(self):
                fn, args, state = small.__reduce__()
                return fn, (args[0], shape, args[2]), state

        path = root / "cifar" / "cifar-10-batches-py" / "data_batch_1"
        path.write_bytes(pickle.dumps({b"data": Huge(), b"labels": [0]}, protocol=2))

    return damage


# ---- the cases ----------------------------------------------------------------------------------------


@dataclass
class Case:
    """``command`` on a copy of a finished run (``{run}``) or on a new path (``{new}``), after ``damage``
    (given the run copy, or for a new run the folder beside it); ``says``: part of the one line."""

    what: str
    command: str
    says: str
    damage: Callable[[Path], None] | None = None
    exit: int = 1
    extra: list[str] = field(default_factory=list)


FIT = "fit --run-dir {new}"
CASES = [
    # configuration: refused before any file is written
    Case("`--lr -1`", FIT + " --lr -1", "--lr must be above 0, got -1"),
    Case("`--lr nan`", FIT + " --lr nan", "--lr must be a finite number, got nan"),
    Case("`--lr inf`", FIT + " --lr inf", "--lr must be a finite number, got inf"),
    Case("`--momentum -1`", FIT + " --momentum -1", "--momentum must be in [0, 1), got -1"),
    Case("`--weight-decay -1`", FIT + " --weight-decay -1", "--weight-decay must be 0 or more, got -1"),
    Case("`--subspace-lr -1`", FIT + " --subspace-lr -1", "--subspace-lr must be above 0, got -1"),
    Case("`--armijo-sigma 2`", FIT + " --armijo-sigma 2", "--armijo-sigma must be between 0 and 1 (exclusive)"),
    Case("`--armijo-beta 1.5`", FIT + " --armijo-beta 1.5", "--armijo-beta must be between 0 and 1 (exclusive)"),
    Case("`--dim 0`", FIT + " --dim 0", "--dim must be at least 1, got 0"),
    Case("`--dim -1`", FIT + " --dim -1", "--dim must be at least 1, got -1"),
    Case(
        "`--dim` not below the snapshots phase 1 will take",
        FIT + " --dim 200",
        "--dim 200 needs at least 201 snapshots, phase 1 takes 34",
    ),
    Case(
        "`--start middle` (any value outside a flag's choices)",
        FIT + " --start middle",
        "argument --start: invalid choice: 'middle'",
        exit=2,
    ),
    Case("an unknown model", FIT + " --model no_such_net", "unknown model 'no_such_net'"),
    Case("an unknown data set", FIT + " --data no_such_set", "unknown data set 'no_such_set'"),
    Case(
        "`synthetic:3x100000x100000:10`",
        FIT + " --data synthetic:3x100000x100000:10",
        "needs 17881.4 GiB of images, more than the 4 GiB synthetic data may take",
    ),
    Case(
        "a CIFAR batch whose pickle asks for a 931 GiB array",
        FIT + " --data cifar10:{root}/cifar",
        "data_batch_1 is not a CIFAR batch",
        damage=cifar_asking_for((1_000_000, 1_000_000)),
    ),
    Case(
        "`--run-dir gs://...` without gcsfs",
        "fit --run-dir gs://bucket/run",
        "--run-dir gs://bucket/run needs a package that is not installed "
        "(Please install gcsfs to access Google Storage); "
        'install it (s3://: pip install "dldr[s3]")',
    ),
    Case("an unknown URL scheme", "fit --run-dir nosuch://bucket/run", "Protocol not known: nosuch"),
    Case(
        "a run directory under a file",
        "fit --run-dir {root}/a-file/run",
        "choose a writable --run-dir",
        damage=lambda root: (root / "a-file").write_text("x"),
    ),
    Case(
        "a config file key of a float (`batch_size: 130.9`)",
        FIT + " --config {config}",
        "batch_size must be an integer, got 130.9",
        damage=config_file(b"batch_size: 130.9\n"),
    ),
    Case(
        "a bool for a number (`lr: true`)",
        FIT + " --config {config}",
        "lr must be a number, got True",
        damage=config_file(b"lr: true\n"),
    ),
    Case(
        "`seed: 1.9`",
        FIT + " --config {config}",
        "seed must be an integer, got 1.9",
        damage=config_file(b"seed: 1.9\n"),
    ),
    Case(
        "null where a key takes none (`run_dir: ~`)",
        "fit --config {config}",
        "run_dir must be a string, got null",
        damage=config_file(b"run_dir: ~\n"),
    ),
    Case(
        "an unknown config key",
        FIT + " --config {config}",
        "unknown key 'learning_rate'",
        damage=config_file(b"learning_rate: 0.1\n"),
    ),
    Case(
        "a config file that is not YAML",
        FIT + " --config {config}",
        "is not valid YAML",
        damage=config_file(b"model: [mlp\n"),
    ),
    Case(
        "a config file that is not UTF-8",
        FIT + " --config {config}",
        "is not UTF-8 text",
        damage=config_file(b"model: \xff\xfe\n"),
    ),
    # a run directory: left byte for byte as it was
    Case("`dldr fit` on an existing run", "fit --run-dir {run}", "already holds a run"),
    Case(
        "`dldr basis --dim` not below the run's snapshots",
        "basis --run-dir {run} --dim 34",
        "--dim 34 needs at least 35 snapshots, phase 1 takes 34",
    ),
    Case(
        "a flag out of range on an existing run",
        "train --run-dir {run} --subspace-lr -1",
        "--subspace-lr must be above 0",
    ),
    Case(
        "a manifest key `basis/../../victim`",
        "basis --run-dir {run}",
        "names 'basis/../../victim', which is not a path inside the run directory",
        damage=escaping_key("basis/../../victim"),
    ),
    Case(
        "a manifest key `subspace/../../victim`",
        "train --run-dir {run}",
        "names 'subspace/../../victim', which is not a path inside the run directory",
        damage=escaping_key("subspace/../../victim"),
    ),
    Case(
        "an absolute manifest key",
        "train --run-dir {run}",
        "which is not a path inside the run directory",
        damage=escaping_key("/tmp/victim"),
    ),
    Case("a torn manifest.json", "basis --run-dir {run}", "is damaged", damage=torn_manifest),
    Case("an empty manifest.json", "basis --run-dir {run}", "is damaged", damage=raw_manifest(b"")),
    Case("manifest.json `{}`", "basis --run-dir {run}", "is damaged (no 'files')", damage=raw_manifest(b"{}")),
    Case("manifest.json `[1,2]`", "basis --run-dir {run}", "is damaged", damage=raw_manifest(b"[1,2]")),
    Case(
        "a manifest entry with a size that is not a number",
        "basis --run-dir {run}",
        "is damaged (a size is 'x')",
        damage=lambda run: rewrite_manifest(run, lambda files: files[SNAPSHOT].update(bytes="x")),
    ),
    Case("a flipped byte in a snapshot", "basis --run-dir {run}", "step-000017.npy is corrupt", damage=flip_byte),
    Case(
        "a missing snapshot",
        "basis --run-dir {run}",
        "step-000017.npy is missing",
        damage=lambda run: (run / SNAPSHOT).unlink(),
    ),
    Case(
        "a snapshot replaced by a FIFO",
        "basis --run-dir {run}",
        "step-000017.npy is not a regular file",
        damage=lambda run: ((run / SNAPSHOT).unlink(), os.mkfifo(run / SNAPSHOT)),
    ),
    Case(
        "a snapshot replaced by a symbolic link",
        "basis --run-dir {run}",
        "step-000017.npy is a symbolic link",
        damage=symlinked,
    ),
    Case(
        "a NaN in a snapshot",
        "basis --run-dir {run}",
        "hold NaN or infinite values",
        damage=tamper(SNAPSHOT, nan_snapshot),
    ),
    Case(
        "a snapshot header claiming 3 TB",
        "basis --run-dir {run}",
        "header claims a float32 array of shape",
        damage=tamper(SNAPSHOT, absurd_header),
    ),
    Case("garbage in metrics.jsonl", "train --run-dir {run}", "the log of", damage=tamper("metrics.jsonl", b"{oops\n")),
    Case(
        "summary.json `[]`",
        "basis --run-dir {run}",
        "summary.json is not a summary of phases",
        damage=tamper("summary.json", b"[]"),
    ),
    Case(
        "coefficients of the wrong shape",
        "train --run-dir {run}",
        "coefficients.npy has shape (34, 3), but the basis report implies (34, 8)",
        damage=tamper("basis/coefficients.npy", lambda _: _npy(np.zeros((34, 3)))),
    ),
    Case(
        "a saved phase 3 state without its keys",
        "train --run-dir {run}",
        "is not a saved phase 3 state",
        damage=saved_state_without_keys,
    ),
    Case(
        "a config.yaml that is not YAML",
        "basis --run-dir {run}",
        "config.yaml is not valid YAML",
        damage=tamper("config.yaml", b"model: [mlp\n"),
    ),
    Case(
        "a config.yaml that is not UTF-8",
        "basis --run-dir {run}",
        "config.yaml is not UTF-8 text",
        damage=tamper("config.yaml", b"model: \xff\n"),
    ),
    Case(
        "a config.yaml with `batch_size: 130.9`",
        "basis --run-dir {run}",
        "batch_size must be an integer",
        damage=tamper("config.yaml", lambda data: data.replace(b"batch_size: 128", b"batch_size: 130.9")),
    ),
    Case(
        "snapshots of a phase 1 that did not finish",
        "basis --run-dir {run}",
        "holds no finished phase sample: it was stopped, failed or never ran",
        damage=summary_without("sample"),
    ),
    Case(
        "a basis of a phase 2 that did not finish",
        "train --run-dir {run}",
        "holds no finished phase basis",
        damage=summary_without("basis"),
    ),
]


def _npy(array: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


@pytest.mark.parametrize("case", CASES, ids=[c.what for c in CASES])
def test_bad_input_is_one_line_and_changes_nothing(case, finished, tmp_path, capsys, monkeypatch):
    root = tmp_path
    run = root / "run"
    shutil.copytree(finished, run)
    sentinel = root / "victim"  # what an escaping manifest key would hit
    sentinel.write_bytes(b"sentinel")
    if case.damage is not None:
        case.damage(run if "{run}" in case.command else root)
    before = tree(root)
    command, *args = [
        part.format(run=run, new=root / "new", root=root, config=root / "config-file.yaml")
        for part in case.command.split()
    ]
    monkeypatch.chdir(root)  # where a run directory without --run-dir would go
    argv = [command, *SMALL, *args]  # the case's flags last: they win
    if case.exit == 2:
        with pytest.raises(SystemExit) as stopped:
            main(argv)
        assert stopped.value.code == 2
    else:
        assert main(argv) == case.exit
    assert case.says in error_line(capsys)
    assert tree(root) == before  # nothing written, nothing removed: the sentinel and every byte of the run
    assert sentinel.read_bytes() == b"sentinel"


# ---- scenarios: real processes, crashes, a full disk ----------------------------------------------------


def dldr_process(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "dldr", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def wait_for(condition: Callable[[], bool], process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def consistent(run: Path) -> None:
    """Every file the manifest lists is there with its checksum, and no entry is left pending."""
    store = RunStore(str(run))
    for rel in store.manifest:
        store.read_bytes(rel)
        assert store_module.PENDING not in store.manifest[rel], rel


def test_a_second_command_on_a_run_in_use_is_refused(finished, tmp_path, capsys):
    """A long `dldr sample` holds the run; `dldr basis` and `dldr train` beside it are refused with one line
    naming it, and change nothing; once it ends, the run is usable."""
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    sampling = dldr_process(
        "sample", "--run-dir", str(run), "--sample-epochs", "400", "--snapshot-every", "0", "--quiet"
    )
    try:
        wait_for(lambda: (run / LOCK).exists() and b"pid" in (run / LOCK).read_bytes(), sampling)
        for command in (["basis", "--dim", "5"], ["train"]):
            assert main([command[0], "--run-dir", str(run), *command[1:], "--quiet"]) == 1
            line = error_line(capsys)
            assert f"is in use by `dldr sample` (pid {sampling.pid} on " in line and "wait for it to end" in line
    finally:
        sampling.send_signal(signal.SIGINT)
        sampling.communicate(timeout=60)
    assert sampling.returncode == 130
    assert not (run / LOCK).exists()
    consistent(run)
    assert main(["sample", "--run-dir", str(run), "--sample-epochs", "2", "--snapshot-every", "1", "--quiet"]) == 0
    assert main(["basis", "--run-dir", str(run), "--dim", "5", "--quiet"]) == 0
    consistent(run)


def test_two_fits_at_once_make_one_run(tmp_path):
    """Started together on one new directory: one makes the run, the other is refused with one line."""
    run = tmp_path / "run"
    both_fits = [dldr_process("fit", "--run-dir", str(run), *SMALL) for _ in range(2)]
    outcomes = sorted((p.wait(timeout=300), p.communicate()[1]) for p in both_fits)
    assert [code for code, _ in outcomes] == [0, 1], outcomes
    refusal = stderr_lines(outcomes[1][1])
    assert len(refusal) == 1 and ("is in use by `dldr fit`" in refusal[0] or "already holds a run" in refusal[0])
    consistent(run)
    assert main(["train", "--run-dir", str(run), "--workers", "0", "--quiet"]) == 0


def _exit_at_manifest_write(number: int) -> str:
    """Python that makes the ``number``-th manifest write of this process end it, as a power cut would."""
    return (
        "import os\nfrom dldr import store\nwrites = [0]\noriginal = store.RunStore._write_manifest\n"
        "def write(self):\n    writes[0] += 1\n"
        f"    if writes[0] == {number}:\n        os._exit(9)\n    original(self)\n"
        "store.RunStore._write_manifest = write\n"
    )


def test_a_crash_between_rename_and_record_leaves_a_usable_run(finished, tmp_path, capsys):
    """Killed after a file is renamed into place and before the manifest records it: a rewritten file is
    accepted (its entry was pending with both checksums) and settled by the next command; a new file is
    unlisted, and the next command removes it and says so."""
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    script = _exit_at_manifest_write(2) + (  # 1: the pending record, rename, 2: the record
        f"store.RunStore({str(run)!r}).write_bytes('summary.json', b'{{\"test_accuracy\": null, \"phases\": {{}}}}')\n"
    )
    assert subprocess.run([sys.executable, "-c", script], cwd=REPO).returncode == 9
    store = RunStore(str(run))
    assert store_module.PENDING in store.manifest["summary.json"]
    assert json.loads(store.read_bytes("summary.json")) == {"test_accuracy": None, "phases": {}}  # the new file
    script = _exit_at_manifest_write(1) + (
        f"store.RunStore({str(run)!r}).save_array('basis/left-over.npy', __import__('numpy').zeros(3))\n"
    )
    assert subprocess.run([sys.executable, "-c", script], cwd=REPO).returncode == 9
    assert (run / "basis/left-over.npy").exists() and "basis/left-over.npy" not in manifest(run)["files"]
    (run / "snapshots/shard-00000-of-00001/step-000003.npy.tmp-0123abcd").write_bytes(b"torn")
    assert main(["sample", "--run-dir", str(run), "--workers", "0", "--quiet"]) == 0
    err = stderr_lines(capsys.readouterr().err)
    assert err == [
        f"dldr: removed 2 files that a stopped command left in {run}: basis/left-over.npy, "
        "snapshots/shard-00000-of-00001/step-000003.npy.tmp-0123abcd"
    ]
    assert not (run / "basis/left-over.npy").exists()
    consistent(run)


def test_a_fifo_snapshot_does_not_hang(finished, tmp_path):
    """Run as a process with a deadline: reading a FIFO would wait for a writer forever."""
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    (run / SNAPSHOT).unlink()
    os.mkfifo(run / SNAPSHOT)
    done = subprocess.run(
        [sys.executable, "-m", "dldr", "basis", "--run-dir", str(run), "--quiet"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert stderr_lines(done.stderr) == [
        f"dldr: error: {run / SNAPSHOT} is not a regular file (a FIFO, device or "
        "folder); re-run `dldr sample` to write it again"
    ]


def test_a_killed_phase_1_is_not_built_on(tmp_path, capsys):
    """SIGKILL in the middle of phase 1: the manifest lists only whole files, and phase 2 refuses the
    partial trajectory until phase 1 is run again."""
    run = tmp_path / "run"
    sampling = dldr_process("fit", "--run-dir", str(run), *SMALL, "--sample-epochs", "400", "--snapshot-every", "0")
    wait_for(lambda: (run / "metrics.jsonl").exists() and "sample" in (run / "metrics.jsonl").read_text(), sampling)
    sampling.kill()
    sampling.communicate()
    store = RunStore(str(run))
    for (
        rel
    ) in store.manifest:  # whole files only; one the kill caught mid-replacement may stay pending (either is valid)
        store.read_bytes(rel)
    assert main(["basis", "--run-dir", str(run), "--quiet"]) == 1
    assert "holds no finished phase sample: it was stopped, failed or never ran; run `dldr sample" in error_line(capsys)
    assert main(["sample", "--run-dir", str(run), "--sample-epochs", "3", "--snapshot-every", "1", "--quiet"]) == 0
    consistent(run)  # the next command settled anything left pending
    assert main(["basis", "--run-dir", str(run), "--quiet"]) == 0


def test_a_diverged_phase_1_is_not_built_on(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["fit", "--run-dir", str(run), *SMALL, "--lr", "1e6"]) == 1
    line = error_line(capsys)
    assert "the sampling loss became nan" in line and "lower --lr" in line
    consistent(run)
    assert main(["basis", "--run-dir", str(run), "--quiet"]) == 1
    assert "holds no finished phase sample" in error_line(capsys)


def test_a_stopped_phase_2_claims_no_basis(finished, tmp_path, monkeypatch):
    """Stopped while it replaces the basis: summary.json no longer claims phase 2 or phase 3, and phase 3
    is refused until phase 2 is run again."""
    from dldr import basis

    run = tmp_path / "run"
    shutil.copytree(finished, run)
    save = basis.RunStore.save_array

    def stop_at_coefficients(self, rel, array):
        if rel == basis.COEFFICIENTS:
            raise KeyboardInterrupt
        save(self, rel, array)

    monkeypatch.setattr(basis.RunStore, "save_array", stop_at_coefficients)
    assert main(["basis", "--run-dir", str(run), "--dim", "5", "--quiet"]) == 130
    monkeypatch.undo()
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary["phases"]) == {"sample"}
    assert not (run / "model.safetensors").exists()
    consistent(run)
    assert main(["train", "--run-dir", str(run), "--quiet"]) == 1
    assert main(["basis", "--run-dir", str(run), "--dim", "5", "--quiet"]) == 0
    assert main(["train", "--run-dir", str(run), "--quiet"]) == 0


def test_resuming_phase_3_with_fewer_epochs_starts_over(finished, tmp_path):
    """A phase 3 stopped after epoch 2 of 4, asked again for 1 epoch: it trains that epoch from the
    start point instead of reporting the saved epoch 2 as done."""
    from dldr import phases

    run = tmp_path / "run"
    shutil.copytree(finished, run)
    assert main(["train", "--run-dir", str(run), "--subspace-epochs", "4", "--quiet"]) == 0
    summary_without("train")(run)  # as a phase 3 stopped after its epoch 4 would leave it
    assert torch.load(run / phases.SUBSPACE_STATE, weights_only=True)["epoch"] == 4
    assert main(["train", "--run-dir", str(run), "--subspace-epochs", "1", "--quiet"]) == 0
    result = json.loads((run / "summary.json").read_text())["phases"]["train"]
    assert result["resumed_after_epoch"] == 0 and result["epochs"] == 1
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if r["phase"] == "train"] == [1]


def test_a_corrupt_basis_shard_is_written_again(finished, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    rel = "basis/shard-00000-of-00001.npy"
    intact = (run / rel).read_bytes()
    flipped = bytearray(intact)
    flipped[-1] ^= 0xFF
    (run / rel).write_bytes(bytes(flipped))
    assert main(["train", "--run-dir", str(run), "--quiet"]) == 0
    assert (run / rel).read_bytes() == intact
    consistent(run)


def _mount_tmpfs(folder: Path, size: str) -> None:
    folder.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True, text=True
    )
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()}")


def test_a_full_disk_is_one_line_and_leaves_a_consistent_run(tmp_path, capsys):
    """A 1 MiB tmpfs fills up in phase 1 (each MLP snapshot is 340 kB): one line that says to free space, the
    manifest lists only whole files, and no temporary file is left."""
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, "1m")
    try:
        run = disk / "run"
        assert main(["fit", "--run-dir", str(run), *SMALL]) == 1
        line = error_line(capsys)
        assert "No space left on device; free space there (or choose another --run-dir)" in line
        consistent(run)
        assert not [p for p in run.rglob("*") if store_module.TMP_MARK in p.name]
        listed = set(manifest(run)["files"]) | {"manifest.json"}
        assert {str(p.relative_to(run)) for p in run.rglob("*") if p.is_file()} <= listed
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_a_full_disk_while_the_manifest_is_written_leaves_the_run_as_it_was(tmp_path):
    """A tmpfs with one page free: a small new file fits, the manifest that would list it does not. The
    error is one line, the new file is removed again, and the manifest still lists every file there is."""
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, "1m")
    try:
        store = RunStore(str(disk / "run"))
        store.write_bytes("summary.json", b"{}" * 2000)  # a manifest write needs one page; this keeps it at one
        filler = disk / "filler"
        with open(filler, "wb", buffering=0) as f, contextlib.suppress(OSError):
            while True:
                f.write(b"x" * 4096)
        os.truncate(filler, filler.stat().st_size - 4096)  # one page free
        with pytest.raises(DldrError) as failed:
            store.write_bytes("plots/extra.png", b"png")
        assert str(failed.value).startswith(
            f"cannot write {disk / 'run' / 'manifest.json'}: No space left on device; free space there"
        )
        assert "plots/extra.png" not in store.manifest and not (disk / "run/plots/extra.png").exists()
        consistent(disk / "run")
        assert sorted(p.name for p in (disk / "run").iterdir()) == ["manifest.json", "plots", "summary.json"]
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_an_object_store_lock_names_its_holder_and_its_heartbeat():
    """memory:// stands for an object store: the lock is an object created exclusively."""
    url = "memory://dldr-faults/locked"
    with RunStore(url).lock("dldr train"):
        with pytest.raises(
            DldrError,
            match=r"memory://dldr-faults/locked is in use by `dldr train` \(pid "
            rf"{os.getpid()} on .*last heartbeat 0 s ago\).*delete "
            r"memory://dldr-faults/locked/\.dldr\.lock",
        ):
            with RunStore(url).lock("dldr basis"):
                pass
    with RunStore(url).lock("dldr basis"):  # released
        pass


def test_a_journal_entry_outside_the_run_is_refused(store):
    with pytest.raises(DldrError, match="a worker's journal names '../x'"):
        store.record({"../x": {"xxh3_128": "0" * 32, "bytes": 1}})


# Cases shown by tests of other subjects: (what, what dldr does, the test that shows it)
SCENARIOS = [
    (
        "a second command on a run in use (real processes)",
        "refused: names the holder's command, pid and host",
        "test_a_second_command_on_a_run_in_use_is_refused",
    ),
    ("two `dldr fit` on one new directory at once", "one run; the other refused", "test_two_fits_at_once_make_one_run"),
    (
        "a crash between a file's rename and its manifest record",
        "the next command settles or removes it, and says so",
        "test_a_crash_between_rename_and_record_leaves_a_usable_run",
    ),
    ("a snapshot replaced by a FIFO (as a process)", "refused at once, no wait", "test_a_fifo_snapshot_does_not_hang"),
    ("SIGKILL in phase 1", "phase 2 refuses the partial trajectory", "test_a_killed_phase_1_is_not_built_on"),
    ("a diverged phase 1", "phase 2 refuses it", "test_a_diverged_phase_1_is_not_built_on"),
    (
        "a stop while phase 2 writes",
        "summary.json claims neither phase 2 nor 3",
        "test_a_stopped_phase_2_claims_no_basis",
    ),
    (
        "a stopped phase 3 resumed with fewer `--subspace-epochs`",
        "starts over",
        "test_resuming_phase_3_with_fewer_epochs_starts_over",
    ),
    ("a corrupt basis shard", "phase 3 writes it again", "test_a_corrupt_basis_shard_is_written_again"),
    (
        "a full disk (1 MiB tmpfs)",
        "one line; only whole files listed",
        "test_a_full_disk_is_one_line_and_leaves_a_consistent_run",
    ),
    (
        "a full disk while manifest.json is written",
        "one line; the file it would have listed removed again",
        "test_a_full_disk_while_the_manifest_is_written_leaves_the_run_as_it_was",
    ),
    (
        "an object-store run in use",
        "refused: holder and heartbeat age, how to break a stale lock",
        "test_an_object_store_lock_names_its_holder_and_its_heartbeat",
    ),
    (
        "a Ray Train worker killed, `--max-failures 0`",
        "one line: `--max-failures`, or run the phase again",
        "tests/test_ray.py::test_a_killed_worker_is_one_line",
    ),
]


def readme_table() -> str:
    rows = ["| input | command | what dldr says |", "| --- | --- | --- |"]
    for case in CASES:
        command = case.command.replace("{new}", "NEW").replace("{run}", "RUN").replace("{root}/", "")
        command = command.replace("{config}", "FILE.yaml")
        rows.append(f"| {case.what} | `dldr {command}` | {case.says.replace('|', '/')} |")
    rows += ["", "| fault | what happens | shown by |", "| --- | --- | --- |"]
    for what, outcome, test in SCENARIOS:
        rows.append(f"| {what} | {outcome} | `{test if '::' in test else 'tests/test_faults.py::' + test}` |")
    return "\n".join(rows)


def test_the_readme_table_is_this_suite():
    """The bad-input tables the README links are rendered from CASES and SCENARIOS, whose tests all exist."""
    for _, _, test in SCENARIOS:
        module, _, name = test.rpartition("::")
        source = (REPO / module).read_text() if module else Path(__file__).read_text()
        assert f"def {name}(" in source, test
    document = (REPO / "docs" / "run-directory.md").read_text()
    assert readme_table() in document, "update the bad-input table of docs/run-directory.md:\n" + readme_table()
