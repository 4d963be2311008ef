"""The command line itself: options from the Config, `--workers auto`, and the README's table of them."""

import json
import os
import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from dldr.cli import _parser, main
from dldr.config import Config, options_table

README = Path(__file__).resolve().parent.parent / "README.md"
TABLE = re.compile(r"<!-- options: .*? -->\n(.*?)<!-- end of options -->", re.S)


def test_the_readmes_option_table_is_the_configs():
    match = TABLE.search(README.read_text())
    assert match, "README.md has no generated table of options"
    assert match.group(1) == options_table(), (
        "the README's table of options differs from the Config's; paste in the output of "
        "python -c 'from dldr.config import options_table; print(options_table(), end=\"\")'"
    )


def test_every_config_field_is_a_flag_with_its_help_and_default():
    fit = next(a for a in _parser()._subparsers._actions if a.dest == "command").choices["fit"]
    flags = {a.dest: a for a in fit._actions}
    for f in fields(Config):
        assert f.metadata["help"] in flags[f.name].help, f.name
    assert flags["workers"].help.endswith("(default: auto)")
    assert flags["optimizer"].choices == ("pbfgs", "psgd")


@pytest.mark.parametrize(
    "flags, env, workers",
    [
        ([], {}, 0),
        (["--workers", "auto"], {}, 0),
        ([], {"RAY_ADDRESS": "10.0.0.1:6379"}, 1),
        (["--address", "10.0.0.1:6379"], {}, 1),
        (["--workers", "2"], {}, 2),
        (["--workers", "0"], {"RAY_ADDRESS": "10.0.0.1:6379"}, 0),
    ],
)
def test_workers_auto_means_ray_only_when_a_cluster_is_named(flags, env, workers, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    args = vars(_parser().parse_args(["fit", *flags]))
    values = {f.name: args[f.name] for f in fields(Config) if f.name in args}
    assert Config.from_dict(values).workers == workers
    assert Config.from_dict({"workers": "auto"}).workers == (1 if env else 0)


def test_a_bad_workers_value_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--workers", "many"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "dldr: error: argument --workers: invalid int value: 'many'; see `dldr fit --help`"
    ]


def test_fit_without_a_cluster_runs_in_this_process_without_ray(tmp_path):
    """The quick start's `dldr fit`: with no --address and no RAY_ADDRESS, Ray is not even imported."""
    code = (
        "import sys; from dldr.cli import main; "
        "code = main(['fit', '--run-dir', 'run', '--sample-epochs', '2', '--subspace-epochs', '1', '--dim', '4', "
        "'--quiet']); print(code, 'ray' in sys.modules)"
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.stdout.strip().splitlines()[-1] == "0 False", out.stderr[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["phases"]["train"]["workers"] == 1 and not (tmp_path / "run" / "checkpoints").exists()
    assert "workers: 0" in (tmp_path / "run" / "config.yaml").read_text()
