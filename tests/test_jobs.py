"""Ray Jobs end to end: a real Ray head from cluster/local-head.sh, `dldr submit` and the commands
that follow a job, the client's errors, and the stop script ending only that head's processes.
"""

import os
import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from dldr.cli import main, run
from dldr.store import RunStore
from tests.helpers import stderr_lines

ROOT = Path(__file__).resolve().parents[1]
DIGITS = str(ROOT / "jobs" / "digits.yaml")
pytestmark = pytest.mark.slow


@dataclass
class Head:
    address: str
    state: Path
    pid: int
    token: Path
    env: dict[str, str]
    gcs_port: int
    dashboard_port: int


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _mentions(state: Path, p: psutil.Process) -> bool:
    """Whether a process names ``state`` (not merely a path that starts with it) in its arguments."""
    return re.search(rf"(^|[ =]){re.escape(str(state))}(/| |$)", " ".join(p.info["cmdline"] or [])) is not None


def _head_processes(state: Path) -> list[psutil.Process]:
    return [p for p in psutil.process_iter(["cmdline"]) if _mentions(state, p)]


@pytest.fixture(scope="module")
def head(tmp_path_factory, s3):
    """A head started the way docs/cluster.md says, with its own token file and free ports (and the
    session's S3 endpoint and credentials in its environment, as a cluster's nodes would have them)."""
    token = tmp_path_factory.mktemp("token") / "auth_token"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
    env.update(PATH=f"{Path(sys.executable).parent}:{env['PATH']}", RAY_AUTH_TOKEN_PATH=str(token))
    port, dashboard, client, agent = _free_ports(4)
    out = subprocess.run(
        [
            str(ROOT / "cluster" / "local-head.sh"),
            "--port",
            str(port),
            "--dashboard-port",
            str(dashboard),
            "--client-port",
            str(client),
            "--agent-port",
            str(agent),
            "--num-cpus",
            "2",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert f"wrote a new token to {token}" in out.stdout and token.stat().st_mode & 0o077 == 0
    state = Path(out.stdout.split("files in ")[1].split()[0])
    started = Head(
        f"http://127.0.0.1:{dashboard}", state, int((state / "head.pid").read_text()), token, env, port, dashboard
    )
    yield started
    if state.exists():  # the stop test did not get to run
        subprocess.run([str(ROOT / "cluster" / "local-head-stop.sh"), str(state)], env=env, timeout=120, check=False)


@pytest.fixture
def cluster_env(head, monkeypatch):
    """This process as a client of the head: its token, and no other Ray address."""
    for name in ("RAY_ADDRESS", "RAY_AUTH_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(head.token))
    return head


def test_the_head_listens_on_loopback_only(head):
    parent = psutil.Process(head.pid)
    processes = [parent, *parent.children(recursive=True)]
    assert any("gcs_server" in " ".join(p.cmdline()) for p in processes)
    listening = [c.laddr for p in processes for c in p.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN]
    assert {head.gcs_port, head.dashboard_port} <= {addr.port for addr in listening}
    assert all(addr.ip in ("127.0.0.1", "::ffff:127.0.0.1") for addr in listening), listening


def test_submit_wait_runs_the_digits_spec_to_its_summary_on_s3(cluster_env, s3, capsys):
    """The run directory on S3: the job writes it there, and `dldr status` and `dldr jobs` read it there."""
    run_dir = f"{s3}/digits-job"
    result = run(["submit", DIGITS, "--address", cluster_env.address, "--wait", "--run-dir", run_dir])
    out = capsys.readouterr().out
    job = result["job_id"]
    assert result["status"] == "SUCCEEDED" and f"job             {job}: SUCCEEDED" in out
    assert job.startswith("dldr-digits-")
    store = RunStore(run_dir)
    summary = store.read_json("summary.json")  # checksummed against the manifest
    assert len(store.files("snapshots/")) == 56 and store.exists("model.safetensors")
    assert summary == result["summary"] and summary["test_accuracy"] >= 0.96
    assert summary["phases"]["train"]["optimizer"] == "pbfgs" and summary["phases"]["basis"]["dim"] == 40
    assert "train (pbfgs, d=40): 10/10 steps" in out  # --wait printed the workers' lines as they came

    run(["logs", job, "--address", cluster_env.address])
    logs = capsys.readouterr().out
    assert f"Running entrypoint for job {job}: python -m dldr fit --config dldr-job.yaml" in logs
    assert f"test accuracy {summary['test_accuracy']:.4f}" in logs

    status = run(["status", job, "--address", cluster_env.address])
    assert status["status"] == "SUCCEEDED" and status["summary"] == summary
    listed = run(["jobs", "--address", cluster_env.address])
    assert job in listed["jobs"] and run_dir in capsys.readouterr().out


def test_a_stopped_job_says_so_and_follow_returns(cluster_env, tmp_path, capsys):
    submitted = run(["submit", DIGITS, "--address", cluster_env.address, "--run-dir", str(tmp_path / "stopped")])
    job = submitted["job_id"]
    assert run(["stop", job, "--address", cluster_env.address])["stopping"]
    run(["logs", job, "--address", cluster_env.address, "--follow"])  # returns once the job has ended
    status = run(["status", job, "--address", cluster_env.address])
    assert status["status"] == "STOPPED"
    assert f"job {job} was stopped" in capsys.readouterr().out
    assert run(["stop", job, "--address", cluster_env.address])["stopping"] is False


def test_a_failed_job_fails_submit_wait_with_the_jobs_own_error(cluster_env, tmp_path, capsys):
    missing = tmp_path / "no-cifar"
    assert (
        main(
            [
                "submit",
                DIGITS,
                "--address",
                cluster_env.address,
                "--wait",
                "--quiet",
                "--data",
                f"cifar10:{missing}",
                "--run-dir",
                str(tmp_path / "failed"),
            ]
        )
        == 1
    )
    err = stderr_lines(capsys.readouterr().err)
    assert len(err) == 1 and re.match(
        r"dldr: error: job dldr-digits-\S+ failed: no cifar-10-batches-py/ folder at " + re.escape(str(missing)), err[0]
    ), err


def _cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dldr", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
        cwd=ROOT,
    )


SPECS = {
    "unknown key": "model: mlp\nsample_epoch: 3\n",
    "unknown resource": "model: mlp\nresources:\n  gpus: 8\n",
    "address in spec": "model: mlp\naddress: 10.0.0.1:6379\n",
}


@pytest.mark.parametrize("case", ["unreachable", "missing token", "wrong token", "unknown job", *SPECS])
def test_bad_input_is_one_line(head, tmp_path, case):
    env = {**head.env, "HOME": str(tmp_path)}  # no ~/.ray/auth_token to fall back on
    address = head.address
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPECS.get(case, ""))
    args = ["submit", str(spec), "--run-dir", str(tmp_path / "never")]
    expected = {
        "unknown key": f"{spec}: unknown key 'sample_epoch'",
        "unknown resource": f"{spec}: resources: unknown key 'gpus'",
        "address in spec": f"{spec}: a submitted job runs on the cluster it is submitted to; remove `address`",
        "missing token": "needs a token and none was found in RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token",
        "wrong token": "refused the token from RAY_AUTH_TOKEN",
        "unknown job": "there is no job dldr-nothing-here on the Ray cluster",
    }.get(case, "")
    if case == "unreachable":
        address = f"http://127.0.0.1:{_free_ports(1)[0]}"
        expected = f"cannot reach a Ray dashboard at {address}"
    elif case == "missing token":
        del env["RAY_AUTH_TOKEN_PATH"]
        args = ["jobs"]
    elif case == "wrong token":
        env["RAY_AUTH_TOKEN"] = "not-the-token"
    elif case == "unknown job":
        args = ["status", "dldr-nothing-here"]
    out = _cli([*args, "--address", address], env)
    assert out.returncode == 1, out
    lines = stderr_lines(out.stderr)
    assert len(lines) == 1 and lines[0].startswith("dldr: error: ") and expected in lines[0], lines
    assert not (tmp_path / "never").exists()


def test_every_job_spec_is_a_valid_config(tmp_path):
    """The specs parse, validate, and say what they reproduce and on which GPUs."""
    from dldr.config import Config, read_spec

    specs = sorted((ROOT / "jobs").glob("*.yaml"))
    assert {s.stem for s in specs} >= {
        "digits",
        "cifar10_resnet20",
        "cifar10_resnet20_noise",
        "cifar100_resnet32",
        "imagenet_resnet18_ffcv",
        "imagenet_resnet50_ffcv",
    }
    for spec in specs:
        text = spec.read_text()
        values, _ = read_spec(text, str(spec))
        Config.from_dict({**values, "run_dir": str(tmp_path)}, source=str(spec))
        assert "Reproduces:" in text and "GPUs:" in text, spec


def test_the_stop_script_ends_only_the_heads_processes(head):
    """By process id: not another head's processes, even one whose folder name starts with this one's."""
    decoy = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time; time.sleep(600)",
            f"--temp-dir={head.state}-other",
            f"{head.state}-other/session_latest",
        ]
    )
    try:
        # other heads' long-lived processes (their workers come and go by themselves), and the decoy
        others = [psutil.Process(decoy.pid)] + [
            p
            for p in psutil.process_iter(["name", "cmdline"])
            if p.info["name"] in ("raylet", "gcs_server") and not _mentions(head.state, p)
        ]
        ours = _head_processes(head.state)
        assert psutil.Process(head.pid) in ours and len(ours) >= 4
        out = subprocess.run(
            [str(ROOT / "cluster" / "local-head-stop.sh"), str(head.state)],
            capture_output=True,
            text=True,
            env=head.env,
            timeout=120,
            check=False,
        )
        assert out.returncode == 0, out.stderr
        assert f"(process {head.pid})" in out.stdout
        # the script waits for the processes it knows to end; give the head's others the same 10 s
        _, alive = psutil.wait_procs(ours, timeout=10)
        assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]
        assert psutil.Process(decoy.pid) in others and all(p.is_running() for p in others)
    finally:
        decoy.kill()
        decoy.wait()
    assert not head.state.exists()
    # nothing listens on the dashboard's port any more; a process that still does is named
    holders = [
        (c.pid, " ".join(psutil.Process(c.pid).cmdline()) if c.pid else "?") for c in _listening(head.dashboard_port)
    ]
    assert not holders, holders


def _listening(port: int, wait: float = 5.0) -> list:
    """The sockets that listen on ``port``, once they are gone or ``wait`` seconds have passed: a process the
    head ended may still be closing its files as the stop script returns."""
    deadline = time.monotonic() + wait
    while True:
        found = [c for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN and c.laddr.port == port]
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def test_a_job_spec_works_as_a_fit_config(tmp_path, capsys):
    """`dldr fit --config jobs/digits.yaml` reads the spec and ignores its resources."""
    run(
        [
            "fit",
            "--config",
            DIGITS,
            "--workers",
            "0",
            "--sample-epochs",
            "1",
            "--subspace-epochs",
            "1",
            "--dim",
            "3",
            "--run-dir",
            str(tmp_path / "local"),
            "--quiet",
        ]
    )
    config = RunStore(str(tmp_path / "local")).read_bytes("config.yaml").decode()
    assert "resources" not in config and "model: mlp" in config
    assert RunStore(str(tmp_path / "local")).read_json("summary.json")["phases"]["basis"]["dim"] == 3
