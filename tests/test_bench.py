"""The benchmark suite at smoke sizes: every benchmark runs, writes its files, and its figures hold together."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

from dldr import cli
from dldr.bench import gpu, large, methods, report, step
from dldr.config import Config

ROOT = Path(__file__).resolve().parents[1]


def _bench(name: str, out) -> dict:
    assert cli.main(["bench", name, "--preset", "smoke", "--out", str(out)]) == 0
    stem = out / f"{name}-smoke"
    assert stem.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert stem.with_suffix(".md").read_text().startswith(f"`dldr bench {name} --preset smoke`")
    report = json.loads(stem.with_suffix(".json").read_text())
    assert report["machine"]["cores"] >= 1 and report["machine"]["versions"]["torch"]
    if sys.platform == "linux":  # the CPU's generation, which "AMD EPYC" alone does not tell
        assert re.search(r" family \d+ model \d+ \[", report["machine"]["cpu"]), report["machine"]["cpu"]
    return report["results"]


@pytest.mark.slow
def test_wallclock_and_label_noise_agree_and_count_epochs(tmp_path):
    wall = _bench("wallclock", tmp_path)["digits, MLP"]
    setting = methods.PRESETS["smoke"][0]
    assert set(wall["grid"]) == {f"{lr:g}" for lr in setting.lrs}
    assert wall["grid"][f"{wall['lr']:g}"] == max(wall["grid"].values())  # cosine SGD's best learning rate
    m = wall["methods"]
    assert list(m) == ["sgd", "sgd_step", "sgd_early", "sgd_short", "dldr 1/3", "dldr 2/3", "psgd", "random"]
    assert m["sgd"]["test_accuracies"] == [wall["grid"][f"{wall['lr']:g}"]]  # the grid's run is seed 0's
    assert m["sgd"]["epochs"] == m["sgd_step"]["epochs"] == setting.sgd_epochs
    subspace = setting.dldr["subspace_epochs"]
    assert m["dldr 1/3"]["epochs"] == m["psgd"]["epochs"] == 1 + subspace and m["dldr 2/3"]["epochs"] == 2 + subspace
    assert m["random"]["epochs"] == subspace and m["sgd_short"]["epochs"] == m["dldr 1/3"]["epochs"]
    assert 1 <= m["sgd_early"]["epochs"] <= setting.sgd_epochs
    assert m["sgd"]["reached_sgd"] == 1  # SGD reaches its own final accuracy
    within = [b for b in setting.budgets if m[f"dldr {b}"]["test_accuracy"] >= m["sgd"]["test_accuracy"] - 0.005]
    assert wall["smallest_budget_within"] == (within[0] if within else None)

    noise = _bench("label_noise", tmp_path)["digits, MLP"]
    assert {"0.0", "0.2", "0.4"} <= set(noise) and noise["lr"] == wall["lr"]
    assert list(noise["0.0"])[:4] == ["sgd", "sgd_early", "dldr 1/3", "psgd"]
    # the same seed and configuration give the same runs in both benchmarks
    for method in ("sgd", "sgd_early", "dldr 1/3", "psgd"):
        assert noise["0.0"][method]["test_accuracies"] == m[method]["test_accuracies"]
    assert noise["0.4"]["sgd"]["test_accuracies"] != noise["0.0"]["sgd"]["test_accuracies"]
    diff = noise["0.4"]["dldr 1/3 - sgd_early"]
    assert diff["points"] == [
        100 * (a - b)
        for a, b in zip(noise["0.4"]["dldr 1/3"]["test_accuracies"], noise["0.4"]["sgd_early"]["test_accuracies"])
    ]


@pytest.mark.slow
def test_sampling_compares_the_three_schedules_at_one_budget(tmp_path):
    result = _bench("sampling", tmp_path)["digits, MLP"]
    r = result["schedules"]
    assert list(r) == ["constant", "step", "cosine"] and result["lr"] == 0.1
    assert all(len(v["dldr"]) == len(v["sampled"]) == 1 for v in r.values())
    assert r["constant"]["sampled"] != r["cosine"]["sampled"]  # the schedules sampled different trajectories


def test_step_breakdown(tmp_path):
    r = _bench("step", tmp_path)["digits, MLP"]
    assert r["pbfgs"]["mean_trials"] >= 1
    assert r["pbfgs"]["breakdown"]["trial_forward"] > 0 and r["pbfgs"]["breakdown"]["projection"] > 0
    assert "trial_forward" not in r["sgd"]["breakdown"] and "projection" not in r["sgd"]["breakdown"]


@pytest.mark.slow
def test_basis_streamed_matches_naive(tmp_path):
    results = _bench("basis", tmp_path)
    assert set(results) == {"1", "2"}
    for r in results.values():
        assert r["snapshot_bytes"] >= 12 * 20_000 * 4
        assert r.get("direct", r["read"])["bytes"] == r["read"]["bytes"]  # past the page cache where it can
        floor = min(r[n]["seconds"] for n in ("read", "direct") if n in r)
        assert r["time_vs_read"] == r["streamed"]["seconds"] / floor
        assert r["largest_principal_angle"] < 1e-2  # naive runs its SVD in float32
        assert r["eigval_max_rel_diff"] < 1e-4


@pytest.mark.slow
def test_distributed_one_and_two_workers_agree(tmp_path, ray_cluster):
    r = _bench("distributed", tmp_path)
    assert r["agreement"]["largest_principal_angle"] < 1e-3
    assert abs(r["agreement"]["test_accuracy_diff"]) <= 1 / 359 + 1e-9
    assert set(r["1"]["wall_seconds"]) == {"sample", "basis", "train"}


@pytest.mark.slow
def test_large_measures_every_phase_and_process_and_bf16_halves_p(tmp_path, ray_cluster):
    r = _bench("large", tmp_path)
    assert list(r["runs"]) == ["1/fp32", "1/bf16", "2/fp32", "2/bf16"]
    sizes = r["sizes"]
    assert sizes == {"num_params": 85_002, "num_snapshots": 12, "dim": 4}
    for key, entry in r["runs"].items():
        shards = entry["shards"]
        assert list(entry["phases"]) == (["sample", "basis", "train"] if key.endswith("fp32") else ["train"])
        for phase in entry["phases"].values():
            assert len(phase["memory"]) == shards and all(m["peak_rss_bytes"] > 50 << 20 for m in phase["memory"])
        train = entry["phases"]["train"]["memory"]
        assert sum(m["basis_rows"] for m in train) == sizes["num_params"]
        width = 4 if entry["basis_dtype"] == "fp32" else 2
        assert [m["basis_bytes"] for m in train] == [width * sizes["dim"] * m["basis_rows"] for m in train]
    assert r["naive_bytes"] == {"basis": 2 * 12 * 85_002 * 4, "train": 85_002 * 4 * 4}
    q = r["projection"]
    assert q["rows"] == 42_501 and q["fp32"]["basis_bytes"] == 2 * q["bf16"]["basis_bytes"]
    assert q["fp32"]["project_rel_error"] < 1e-6 < q["bf16"]["project_rel_error"] < 1e-2
    assert q["fp32"]["lift_rel_error"] < 1e-6 < q["bf16"]["lift_rel_error"] < 1e-2
    real = r["real"]["mlp on digits"]
    assert real["difference_points"] == pytest.approx(
        100 * (real["bf16"]["test_accuracy"] - real["fp32"]["test_accuracy"])
    )
    assert real["fp32"]["basis_bytes"] == 2 * real["bf16"]["basis_bytes"]


@pytest.mark.slow
def test_device_check_runs_at_cpu_size(tmp_path):
    """benchmarks/gpu_check.sh as a GPU machine runs it, at the CPU sizes of its smoke preset."""
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(tmp_path), "smoke"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    r = json.loads((tmp_path / "gpu-smoke.json").read_text())["results"]
    tests = r["cuda_tests"]["tests"]
    assert len(tests) == 7 and {t["outcome"] for t in tests.values()} == {"passed"}  # DLDR_TEST_DEVICE=cpu
    assert set(r["step"]) == {s.label for s in step.PRESETS["smoke"]}
    assert (
        list(r["large"]["phases"]) == ["sample", "basis", "train"] and r["large"]["step"]["pbfgs"]["mean_trials"] >= 1
    )
    assert set(r["real"]["digits, MLP"]) == {"sgd", "dldr 1/3"}
    assert (tmp_path / "gpu-smoke.md").read_text().startswith("`dldr bench gpu --preset smoke`")


def test_unknown_benchmark_or_preset_is_one_line(capsys):
    assert cli.main(["bench", "basis", "--preset", "gpu"]) == 1
    assert capsys.readouterr().err.strip().startswith("dldr: error: basis has no preset 'gpu'; use one of")
    if not torch.cuda.is_available():
        assert cli.main(["bench", "step", "--preset", "gpu"]) == 1
        assert capsys.readouterr().err.strip() == (
            "dldr: error: --preset gpu needs a CUDA GPU and torch sees none; use --preset cpu"
        )
    with pytest.raises(SystemExit):
        cli.main(["bench", "nope"])


def test_gpu_presets_are_valid_configurations():
    """The gpu presets cannot run here; their keys, values and models must still be right."""
    for setting in methods.PRESETS["gpu"]:
        for budget in setting.budgets:
            Config.from_dict(
                {
                    **setting.common,
                    **setting.dldr,
                    "model": setting.model,
                    "data": setting.data,
                    "sample_epochs": setting.sample_epochs(budget),
                    "lr": setting.lrs[0],
                }
            )
        assert timm.is_model(setting.model)
    for setting in [*step.PRESETS["gpu"], gpu.PRESETS["gpu"].large]:
        Config.from_dict(setting.config)
        assert timm.is_model(setting.config["model"])
    for setting in gpu.PRESETS["gpu"].real:
        Config.from_dict({**setting.common, "model": setting.model, "data": setting.data})
    Config.from_dict(large.PRESETS["cpu"].config)


def test_the_benchmark_readme_shows_the_latest_results():
    """Every table in benchmarks/README.md is the .md file of its benchmark's latest run."""
    readme = Path(__file__).resolve().parent.parent / "benchmarks" / "README.md"
    text = readme.read_text()
    names = [m["name"] for m in report.RESULTS_BLOCK.finditer(text)]
    assert len(names) >= 10, names
    assert text == report.embed_results(text, readme.parent / "results"), (
        "benchmarks/README.md differs from benchmarks/results/*.md; run `python -m dldr.bench.report`"
    )
