"""``dldr``: run DLDR end to end (``fit``) or one phase on a run directory; submit and follow Ray Jobs."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable, Iterator
from dataclasses import fields
from typing import TYPE_CHECKING, Any

from dldr import tracking
from dldr.config import Config, flag_type, read_spec, shown_default
from dldr.errors import DldrError
from dldr.store import RunStore, holds_run

if TYPE_CHECKING:
    from ray.job_submission import JobDetails

    from dldr import jobs, phases


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line, like every other error of dldr."""

    def error(self, message: str):
        self.exit(2, f"dldr: error: {message}; see `{self.prog} --help`\n")


def _config_flags(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """A flag for every Config field: only the flags given override the config."""
    for f in fields(Config):
        if f.name not in skip:
            several = {"action": "append"} if f.name == "tracker" else {}
            parser.add_argument(
                "--" + f.name.replace("_", "-"),
                dest=f.name,
                type=flag_type(f),
                choices=f.metadata.get("choices"),
                default=argparse.SUPPRESS,
                help=f"{f.metadata['help']} (default: {shown_default(f)})".replace("%", "%%"),
                **several,
            )


def _parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument("--config", metavar="FILE.yaml", help="YAML file of configuration keys (a job spec works too)")
    common.add_argument("--quiet", action="store_true", help="no progress bars")
    _config_flags(common)
    parser = _Parser(
        prog="dldr", description="Train neural networks in a tiny subspace of their parameters (DLDR + P-BFGS)."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("fit", parents=[common], help="all three phases in a new run directory")
    sub.add_parser("sample", parents=[common], help="phase 1: SGD, writing parameter snapshots")
    sub.add_parser("basis", parents=[common], help="phase 2: the d-dimensional basis of a run's snapshots")
    sub.add_parser("train", parents=[common], help="phase 3: train in the subspace of a run's basis")

    dashboard = _Parser(add_help=False)
    dashboard.add_argument(
        "--address",
        dest="dashboard",
        default="",
        metavar="http://HOST:8265",
        help="the Ray cluster's dashboard (default: RAY_ADDRESS, else the one cluster/local-head.sh "
        "starts, http://127.0.0.1:8265)",
    )
    submit = sub.add_parser("submit", parents=[dashboard], help="run a job spec on a Ray cluster (Ray Jobs)")
    submit.add_argument("spec", metavar="SPEC.yaml", help="a job spec: configuration keys plus resources (see jobs/)")
    submit.add_argument(
        "--wait", action="store_true", help="print the job's logs until it ends; exit 1 unless it succeeded"
    )
    submit.add_argument("--quiet", action="store_true", help="with --wait: no logs, only the result")
    _config_flags(submit, skip=("address",))
    for name, text in (
        ("status", "a job's state and, once it succeeded, its results"),
        ("logs", "a job's logs"),
        ("stop", "stop a job (its run directory stays)"),
    ):
        command = sub.add_parser(name, parents=[dashboard], help=text)
        command.add_argument("job", metavar="JOB", help="the job id `dldr submit` printed (`dldr jobs` lists them)")
    sub.choices["logs"].add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")
    sub.add_parser("jobs", parents=[dashboard], help="the jobs on a Ray cluster")

    from dldr.bench import BENCHMARKS, DEFAULT_OUT

    bench = sub.add_parser("bench", help="run a benchmark: " + ", ".join(BENCHMARKS))
    bench.add_argument(
        "name",
        choices=list(BENCHMARKS),
        metavar="NAME",
        help="; ".join(f"{k}: {v}" for k, v in BENCHMARKS.items()).replace("%", "%%"),
    )
    bench.add_argument(
        "--preset",
        default="cpu",
        help="cpu (digits and small sizes, minutes), fashion (wallclock, "
        "label_noise and sampling on Fashion-MNIST, under an hour "
        "each), gpu (needs a CUDA GPU) or smoke (tiny sizes, "
        "seconds); default: cpu",
    )
    bench.add_argument("--out", default=DEFAULT_OUT, help=f"folder of the results (default: {DEFAULT_OUT})")
    bench.add_argument(
        "--work-dir",
        default=None,
        help="where the benchmark's runs and files go while it runs (default: the system's temp folder)",
    )

    data = sub.add_parser("data", help="data set tools").add_subparsers(dest="tool", required=True, metavar="TOOL")
    convert = data.add_parser("convert", help="write one split of a data set as an ffcv .beton file")
    convert.add_argument("source", metavar="SRC", help="a --data spec, e.g. imagefolder:/data/imagenet")
    convert.add_argument("out", metavar="OUT.beton", help="the file to write; its card OUT.beton.json goes beside it")
    convert.add_argument(
        "--split", choices=("train", "val"), default="train", help="the split to write (default: train)"
    )
    convert.add_argument(
        "--max-resolution", type=int, default=256, help="longest side of ImageFolder images in the file (default: 256)"
    )
    convert.add_argument(
        "--jpeg", action="store_true", help="store JPEG instead of raw pixels (smaller, slower to decode)"
    )
    convert.add_argument("--workers", type=int, default=2, help="writer processes (default: 2)")
    return parser


def _convert(args: argparse.Namespace) -> dict[str, Any]:
    from dldr import data
    from dldr.data import beton

    card = beton.convert(
        data.load(args.source, loader_workers=0), args.split, args.out, args.max_resolution, args.jpeg, args.workers
    )
    print(
        f"wrote {args.out}: {card['samples']} images of the {args.split} split of {card['source']} "
        f"({card['num_classes']} classes), card {beton.card_path(args.out).name}"
    )
    return card


def _config_values(args: argparse.Namespace) -> dict[str, Any]:
    values: dict[str, Any] = {}
    if args.config:
        try:
            with open(args.config, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise DldrError(f"cannot read --config {args.config}: {e.strerror}") from None
        except UnicodeDecodeError as e:
            raise DldrError(f"--config {args.config} is not UTF-8 text ({e.reason} at byte {e.start})") from None
        values.update(read_spec(text, source=args.config)[0])
    values.update({f.name: getattr(args, f.name) for f in fields(Config) if hasattr(args, f.name)})
    if isinstance(values.get("tracker"), list):  # --tracker given once or more
        values["tracker"] = ",".join(values["tracker"])
    return values


def run(argv: list[str] | None = None) -> dict[str, Any]:
    args = _parser().parse_args(argv)
    if args.command == "data":
        return _convert(args)
    if args.command == "bench":
        from dldr import bench

        return {"results": str(bench.run(args.name, args.preset, args.out, args.work_dir))}
    if args.command in JOB_COMMANDS:
        return _job_command(args)
    from dldr import phases  # torch and the data sets: not needed to speak to a job server

    values = _config_values(args)
    progress = not args.quiet
    run_dir = values.get("run_dir")
    names = list(phases.PHASE_FUNCTIONS) if args.command == "fit" else [args.command]
    new = args.command == "fit" or (args.command == "sample" and not (run_dir and holds_run(run_dir)))
    if new:  # everything that can be known before the run directory exists
        cfg = Config.from_dict(values, source="command line")
        tracking.check(cfg)
        phases.check_sampling(cfg, names)
        run_dir = cfg.run_dir
    elif run_dir is None:
        raise DldrError(f"`dldr {args.command}` needs the --run-dir of an existing run")
    with RunStore(run_dir).lock(f"dldr {args.command}"):
        run: phases.Run | None = None
        if not new:
            run = phases.open_run(values.pop("run_dir"), values, progress)
            phases.check_phases(run, names)
            cfg = run.cfg
            tracking.check(cfg)
        store = run.store if run else RunStore(run_dir)
        if run is None:
            phases.refuse_existing(store)
        _sweep(store)
        if cfg.workers:
            from dldr import ray_train  # the in-process path (--workers 0) runs without Ray

            with ray_train.cluster(cfg.address):
                ray_train.check_placement(cfg)  # before a new run directory exists
                run = run or phases.start_run(cfg, progress, checked=True)
                _tracked(run, args.command, lambda: ray_train.run_phases(run, names))
        else:
            run = run or phases.start_run(cfg, progress, checked=True)
            _tracked(run, args.command, lambda: [phases.PHASE_FUNCTIONS[name](run) for name in names])
        phases.save_config(run)
    _print_summary(run.store.url, run.log.summary)
    return run.log.summary


def _tracked(run: phases.Run, command: str, work: Callable[[], object]) -> None:
    """``work`` with the command's trackers open (``dldr.tracking``): one MLflow run from start to end."""
    run.tracking = run.log.tracking = tracking.start(run.cfg, run.store, f"dldr {command}")
    try:
        work()
    except BaseException:
        with contextlib.suppress(Exception):  # the error that stopped the work says more
            tracking.finish(run.tracking, run.store, failed=True)
        raise
    tracking.finish(run.tracking, run.store, failed=False)


def _sweep(store: RunStore) -> None:
    removed = store.sweep()
    if removed:
        shown = ", ".join(removed[:3]) + (f" and {len(removed) - 3} more" if len(removed) > 3 else "")
        print(
            f"dldr: removed {len(removed)} file{'s' * (len(removed) > 1)} that a stopped command left in "
            f"{store.url}: {shown}",
            file=sys.stderr,
        )


def _print_summary(run_dir: str, summary: dict[str, Any]) -> None:
    p = summary["phases"]
    lines = [f"run directory   {run_dir}"]
    if "sample" in p:
        s = p["sample"]
        lines.append(
            f"sample          {s['epochs']} epochs of SGD, {s['snapshots']} snapshots, "
            f"test accuracy {s['test_accuracy']:.4f}, {s['seconds']:.1f} s"
        )
    if "basis" in p:
        b = p["basis"]
        lines.append(
            f"basis           {b['subspace']}, d = {b['dim']}, explained variance "
            f"{b['explained_variance_ratio']:.4f}, {b['seconds']:.1f} s"
        )
    if "train" in p:
        t = p["train"]
        lines.append(
            f"train           {t['epochs']} epochs of {t['optimizer']}, test accuracy {t['test_accuracy']:.4f}, "
            f"{t['line_search_failures']} line-search failures, {t['seconds']:.1f} s"
        )
    print("\n".join(lines))


# ---- Ray Jobs -----------------------------------------------------------------------------------

JOB_COMMANDS = ("submit", "status", "logs", "stop", "jobs")


def _job_command(args: argparse.Namespace) -> dict[str, Any]:
    from dldr import jobs  # Ray's job client; the commands above run without it

    if args.command == "submit":
        overrides = {f.name: getattr(args, f.name) for f in fields(Config) if hasattr(args, f.name)}
        job = jobs.submit(args.spec, overrides, args.dashboard)
        print(f"submitted {job.job_id} to {job.cluster.address}\nrun directory   {job.run_dir}")
        if not args.wait:
            print(f"follow it with `dldr logs {job.job_id} --follow`; `dldr status {job.job_id}` shows its result")
            return {"job_id": job.job_id}
        with _still_running(job.job_id):
            details = jobs.wait(job.cluster, job.job_id) if args.quiet else jobs.follow(job.cluster, job.job_id)
        return _report(job.cluster, details, check=True)
    cluster = jobs.Cluster.connect(args.dashboard)
    if args.command == "jobs":
        rows = [
            (j.submission_id, j.status.value, jobs.when(j.start_time), jobs.run_dir(j) or "-")
            for j in jobs.list_jobs(cluster)
        ]
        table = [("JOB", "STATUS", "STARTED", "RUN DIRECTORY"), *rows]
        widths = [max(len(row[i]) for row in table) for i in range(4)]
        for row in table:
            print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
        return {"jobs": [row[0] for row in rows]}
    if args.command == "logs":
        if args.follow:
            with _still_running(args.job):
                jobs.follow(cluster, args.job)
        else:
            print(jobs.logs(cluster, args.job), end="")
        return {"job_id": args.job}
    if args.command == "stop":
        stopping = jobs.stop(cluster, args.job)
        print(f"stopping {args.job}" if stopping else f"{args.job} had already ended")
        return {"job_id": args.job, "stopping": stopping}
    return _report(cluster, jobs.info(cluster, args.job), check=False)


@contextlib.contextmanager
def _still_running(job_id: str) -> Iterator[None]:
    """Ctrl-C while following a job stops the following, not the job: say so."""
    try:
        yield
    except KeyboardInterrupt:
        raise KeyboardInterrupt(
            f"stopped following {job_id}; it keeps running on the cluster (`dldr stop {job_id}` ends it)"
        ) from None


def _report(cluster: jobs.Cluster, details: JobDetails, check: bool) -> dict[str, Any]:
    """A job's state, and its results once it succeeded; ``check``: a job that did not succeed is an error."""
    from dldr import jobs

    run_dir = jobs.run_dir(details)
    status = details.status.value
    span = f"{jobs.when(details.start_time)} - {jobs.when(details.end_time)}"
    print(f"job             {details.submission_id}: {status} ({span})")
    if status == "SUCCEEDED" and run_dir:
        try:
            summary = RunStore(run_dir).read_json("summary.json")
        except (DldrError, OSError):
            print(f"run directory   {run_dir} (its summary.json cannot be read from here)")
        else:
            _print_summary(run_dir, summary)
            return {"job_id": details.submission_id, "status": status, "run_dir": run_dir, "summary": summary}
    elif details.status.is_terminal() and status != "SUCCEEDED":
        reason = jobs.failure(details, jobs.logs(cluster, details.submission_id))
        if check:
            raise DldrError(reason)
        print(reason)
    else:
        print(f"run directory   {run_dir or '-'}")
    return {"job_id": details.submission_id, "status": status, "run_dir": run_dir}


def main(argv: list[str] | None = None) -> int:
    try:
        run(argv)
    except DldrError as e:
        print(f"dldr: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        print(
            f"dldr: {e.args[0] if e.args else 'interrupted; the run directory keeps every file completed so far'}",
            file=sys.stderr,
        )
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
