"""The device check: every GPU figure the project needs, from one in-process run (no Ray) of about 5
minutes on one H200 (253 s measured). ``benchmarks/gpu_check.sh OUT`` runs it with the repository on PYTHONPATH.

cuda_tests  tests/test_cuda.py (``pytest -m cuda``): each test's outcome and seconds
step        ``dldr bench step``'s gpu settings: a CIFAR ResNet-20 at batch 128, resnet18 at 224 px,
            batch 256, bf16 autocast, channels-last: P-BFGS and P-SGD steps against SGD's, piece by piece
large       ViT-B/16 at 224 px in bf16 through all three phases with P (d = 40, 13.8 GB) on the GPU:
            seconds and peak CUDA and resident memory per phase, then its P-BFGS step against SGD's
real        Fashion-MNIST: cosine SGD for 24 epochs (at the lr wallclock's grid picked) against DLDR
            sampling a third of them, at GPU speed; its IDX files are read from $DLDR_FASHION_MNIST
            where that is set (a machine without the Debian package), else the package's folder

``--preset smoke`` runs the same at CPU sizes (the CUDA tests with DLDR_TEST_DEVICE=cpu), in the test
suite, so that the check runs on every commit and works when a GPU comes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from dldr import phases
from dldr.bench import methods, report, step
from dldr.config import Config
from dldr.errors import DldrError

TESTS = Path(__file__).resolve().parents[2] / "tests" / "test_cuda.py"
GB = 1e9


@dataclass
class Preset:
    test_device: str | None  # DLDR_TEST_DEVICE of the CUDA tests; None: the GPU
    steps: list[step.Setting]
    large: step.Setting  # through all three phases, then its steps
    real: list[methods.Setting] = field(default_factory=list)


_VIT = {
    "model": "vit_base_patch16_224",
    "data": "synthetic:3x224x224:100:256",
    "batch_size": 64,
    "precision": "bf16",
    "sample_epochs": 11,
    "snapshot_every": 1,
    "dim": 40,
    "start": "last",
    "subspace_batch_size": 64,
    "subspace_epochs": 1,
    "device": "cuda",
}
PRESETS = {
    "gpu": Preset(
        None,
        step.PRESETS["gpu"],
        step.Setting("224 px, ViT-B/16, bf16", _VIT, steps=10, warmup=3),
        [
            methods.Setting(
                f"Fashion-MNIST, {label}",
                model,
                "fashion-mnist",
                24,
                (methods.FASHION_LR,),
                budgets=("1/3",),
                seeds=(0,),
                common={"device": "cuda"},
            )
            for label, model in (("MLP", "mlp"), ("LeNet-5", "lenet5"))
        ],
    ),
    "smoke": Preset(
        "cpu",
        step.PRESETS["smoke"],
        step.Setting("digits, MLP", {**step.PRESETS["smoke"][0].config, "subspace_epochs": 1}, steps=3, warmup=1),
        [
            methods.Setting(
                "digits, MLP",
                "mlp",
                "digits",
                3,
                (0.1,),
                budgets=("1/3",),
                seeds=(0,),
                dldr={"snapshot_every": 1, "dim": 4, "subspace_epochs": 1},
            )
        ],
    ),
}


def cuda_tests(work: Path, device: str | None) -> dict[str, Any]:
    """tests/test_cuda.py in a pytest of its own; every test's outcome and seconds."""
    if not TESTS.exists():
        raise DldrError(f"the CUDA tests are not at {TESTS}; run the device check from a checkout of the repository")
    env = {**os.environ, **({"DLDR_TEST_DEVICE": device} if device else {})}
    xml = work / "cuda-tests.xml"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}", str(TESTS)],
        env=env,
        cwd=TESTS.parents[1],
        capture_output=True,
        text=True,
        check=False,
    )
    tests = {}
    for case in ElementTree.parse(xml).iter("testcase"):
        outcome = next((child.tag for child in case if child.tag in ("failure", "error", "skipped")), "passed")
        problem = next((child.get("message", "") for child in case if child.tag != "properties"), "")
        tests[case.get("name")] = {
            "outcome": outcome,
            "seconds": float(case.get("time", 0)),
            **({"message": problem[:500]} if problem else {}),
        }
    print(f"CUDA tests: {sum(t['outcome'] == 'passed' for t in tests.values())} of {len(tests)} passed", flush=True)
    return {
        "device": device or "cuda",
        "exit_code": done.returncode,
        "tests": tests,
        "output_tail": done.stdout[-2000:],
    }


def large(setting: step.Setting, work: Path) -> dict[str, Any]:
    """All three phases of ``setting.config``, then its steps: seconds and memory per phase, and the step ratio."""
    run = phases.start_run(
        Config.from_dict({**setting.config, "workers": 0, "run_dir": str(work / "large")}), progress=False
    )
    summary = {name: fn(run) for name, fn in phases.PHASE_FUNCTIONS.items()}
    result = {
        "phases": {name: {"seconds": s["seconds"], "memory": s["memory"]} for name, s in summary.items()},
        "test_accuracy": summary["train"]["test_accuracy"],
        "step": step.measure(run, setting),
    }
    print(f"{setting.label}: " + ", ".join(f"{name} {s['seconds']:.1f} s" for name, s in summary.items()), flush=True)
    return result


def real(setting: methods.Setting, work: Path) -> dict[str, Any]:
    """Cosine SGD for the full budget against DLDR at its headline budget, one seed."""
    if setting.data == "fashion-mnist" and os.environ.get("DLDR_FASHION_MNIST"):
        setting = replace(setting, data=f"fashion-mnist:{os.environ['DLDR_FASHION_MNIST']}")
    runner = methods.Runner(setting, setting.seeds[0], 0.0, setting.lrs[0], work / setting.model)
    outcomes = {"sgd": runner.sgd("sgd")[1], **runner.dldr(setting.headline, psgd=False, random=False)}
    return {
        name: {"test_accuracy": o.test_accuracy, "epochs": o.epochs, "seconds": o.seconds}
        for name, o in outcomes.items()
    }


def run(preset_name: str, work: Path) -> tuple[dict, dict, str, Figure]:
    preset = PRESETS[preset_name]
    results = {
        "cuda_tests": cuda_tests(work, preset.test_device),
        "step": {s.label: step.measure(step.sampled(s, work / f"step-{i}"), s) for i, s in enumerate(preset.steps)},
        "large": large(preset.large, work),
        "real": {s.label: real(s, work) for s in preset.real},
    }
    settings = {
        "test_device": preset.test_device,
        "steps": [s.label for s in preset.steps],
        "large": preset.large.config,
        "real": [s.label for s in preset.real],
    }
    return settings, results, _markdown(preset, results), step.figure(results["step"])


def _gb(n: int | None) -> str:
    return "-" if n is None else f"{n / GB:.2f}"


def _markdown(preset: Preset, results: dict[str, Any]) -> str:
    tests = results["cuda_tests"]
    text = f"**CUDA tests** (tests/test_cuda.py on {tests['device']}; pytest exit code {tests['exit_code']})\n\n"
    text += report.table(
        ["test", "outcome", "seconds"],
        [[name, t["outcome"], f"{t['seconds']:.1f}"] for name, t in tests["tests"].items()],
    )
    text += "\n" + step.markdown(preset.steps, results["step"])
    big = results["large"]
    text += f"**{preset.large.label}** through all three phases (test accuracy {big['test_accuracy']:.4f})\n\n"
    text += report.table(
        ["phase", "seconds", "peak CUDA memory, GB", "peak RSS, GB", "snapshots held, GB", "P_r held, GB"],
        [
            [
                name,
                f"{p['seconds']:.1f}",
                _gb(p["memory"][0]["peak_cuda_bytes"]),
                _gb(p["memory"][0]["peak_rss_bytes"]),
                _gb(p["memory"][0].get("snapshot_bytes")),
                _gb(p["memory"][0].get("basis_bytes")),
            ]
            for name, p in big["phases"].items()
        ],
    )
    text += "\n" + step.markdown([preset.large], {preset.large.label: big["step"]})
    if results["real"]:
        rows = [
            [label, name, f"{o['test_accuracy']:.4f}", o["epochs"], f"{o['seconds']:.1f}"]
            for label, outcomes in results["real"].items()
            for name, o in outcomes.items()
        ]
        text += "**Real data**, one seed\n\n" + report.table(
            ["setting", "method", "test accuracy", "epochs", "seconds"], rows
        )
    return text
