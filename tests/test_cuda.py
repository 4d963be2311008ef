"""dldr on a CUDA GPU: the same steps as on the CPU, the projection against float64, bf16 autocast and
channels-last through all three phases, BatchNorm buffers under trial forwards, phase 3's peak memory.

Skipped where torch sees no GPU; `pytest -m cuda` selects them alone. DLDR_TEST_DEVICE=cpu runs them
on the CPU instead (the device check's smoke run, `dldr bench gpu --preset smoke`, does in the test
suite), so that they run somewhere on every commit and cannot rot before a GPU comes.
"""

import contextlib
import copy
import os

import pytest
import torch
from torch import nn

# cuBLAS is deterministic only with a fixed workspace, which must be set before its first use
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

from dldr import phases  # noqa: E402
from dldr.config import Config  # noqa: E402
from dldr.optim import PBFGS  # noqa: E402
from dldr.params import FlatParams, trainable  # noqa: E402
from dldr.store import RunStore  # noqa: E402
from dldr.subspace import Subspace  # noqa: E402
from tests.helpers import bn_problem, model_closure, orthonormal  # noqa: E402

DEVICE = os.environ.get("DLDR_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else None)
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(DEVICE is None, reason="torch sees no CUDA GPU (DLDR_TEST_DEVICE=cpu runs these on the CPU)"),
]


@contextlib.contextmanager
def deterministic():
    """Deterministic kernels in full float32: cuDNN convolutions default to TF32 (10-bit mantissa), which
    moved 8 P-BFGS steps of LeNet-5 by 2e-3 relative on an H200."""
    before = (
        torch.are_deterministic_algorithms_enabled(),
        torch.backends.cudnn.allow_tf32,
        torch.backends.cuda.matmul.allow_tf32,
    )
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before[1:]


def _run(tmp_path, device: str, **keys) -> phases.Run:
    cfg = Config.from_dict({"workers": 0, "device": device, "run_dir": str(tmp_path / f"run-{device}"), **keys})
    return phases.Run(cfg, RunStore(cfg.run_dir), progress=False)


@pytest.mark.parametrize("optimizer", ["pbfgs", "psgd"])
def test_subspace_optimizers_take_the_cpus_steps(tmp_path, optimizer):
    """LeNet-5 (convolutions, no BatchNorm), 8 steps from the same start in the same random subspace."""
    coords = {}
    for device in ("cpu", DEVICE):
        run = _run(tmp_path, device, model="lenet5", data="synthetic:1x28x28:10:2048", optimizer=optimizer)
        data = phases.load_data(run.cfg)
        model = phases.build_model(run, data)
        flat = FlatParams(trainable(model))
        opt = phases.make_optimizer(
            run.cfg, model, Subspace(orthonormal(flat.numel, 8).float().to(device), slice(0, flat.numel))
        )
        with deterministic():
            for step, (x, y) in enumerate(data.train_batches(256, 0, 1)):
                if step == 8:
                    break
                opt.step(phases.closure(run, opt, model, x, y))
        coords[device] = opt.state[flat.params[0]]["coords"].cpu()
    cpu, other = coords["cpu"], coords[DEVICE]
    assert cpu.abs().max() > 0
    assert float((other - cpu).norm() / cpu.norm()) < 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_projection_and_lift_match_float64(dtype):
    g = torch.Generator().manual_seed(0)
    rows, dim = 1_000_003, 8  # not a multiple of the 256-row blocks nor of the 65,536 rows a bf16 P is widened in
    basis = torch.randn(rows, dim, generator=g).to(dtype)
    grad, coords = torch.randn(rows, generator=g), torch.randn(dim, generator=g, dtype=torch.float64)
    exact = basis.double()  # the float64 reference of the very values the device holds
    space = Subspace(basis.to(DEVICE), slice(0, rows))
    projected = space.project(grad.to(DEVICE)).cpu()
    expected = exact.T @ grad.double()
    assert float((projected - expected).abs().max() / expected.abs().max()) < 1e-6
    lifted = space.lift(coords.to(DEVICE)).cpu()
    assert lifted.dtype == torch.float32
    assert float((lifted.double() - exact @ coords).abs().max() / (exact @ coords).abs().max()) < 1e-6


def test_bf16_autocast_and_channels_last_through_all_three_phases(tmp_path, monkeypatch):
    seen = []  # (phase, input channels-last, output dtype) of every convolution's forward in a training step
    build = phases.build_model

    def watched(run, data):
        model = build(run, data)
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                assert module.weight.is_contiguous(memory_format=torch.channels_last)
                module.register_forward_hook(
                    lambda m, args, out: (
                        seen.append((args[0].is_contiguous(memory_format=torch.channels_last), out.dtype))
                        if m.training
                        else None
                    )
                )
        return model

    monkeypatch.setattr(phases, "build_model", watched)
    cfg = Config.from_dict(
        {
            "model": "cnn",
            "data": "digits",
            "workers": 0,
            "device": DEVICE,
            "precision": "bf16",
            "basis_dtype": "bf16",
            "lr": 0.02,
            "sample_epochs": 4,
            "dim": 10,
            "subspace_epochs": 1,
            "run_dir": str(tmp_path / "run"),
        }
    )
    run = phases.start_run(cfg, progress=False)
    results = {name: fn(run) for name, fn in phases.PHASE_FUNCTIONS.items()}
    assert seen and all(seen_cl for seen_cl, _ in seen)
    assert {dtype for _, dtype in seen} == {torch.bfloat16}
    assert results["train"]["test_accuracy"] > 0.85
    train_memory = results["train"]["memory"][0]
    assert train_memory["basis_bytes"] == 2 * train_memory["basis_rows"] * 10  # P held in bfloat16
    for name in ("sample", "train"):
        peak = results[name]["memory"][0]["peak_cuda_bytes"]
        assert (peak > 0) if DEVICE == "cuda" else peak is None


def test_trial_forwards_leave_batchnorm_buffers_as_one_training_forward_would():
    model, x, y, basis, num = bn_problem(DEVICE)
    reference = copy.deepcopy(model)
    reference(x)  # the single training forward that may move the running statistics
    opt = PBFGS(model.parameters(), Subspace(basis, slice(0, num)), buffers=list(model.buffers()))
    opt.step(model_closure(opt, model, x, y))
    assert opt.state[next(model.parameters())]["trials"] >= 1
    for got, want in zip(model.buffers(), reference.buffers(), strict=True):
        assert torch.equal(got, want)


def test_phase_3_peak_memory_is_model_optimizer_and_basis(tmp_path):
    """ResNet-18 (11.2M parameters) with P_r of d = 4 on the device: phase 3's peak CUDA memory stays within
    P_r, eight copies of the model (weights, gradients, w_start, P p, the line search's point and buffers,
    the flattened gradient) and 128 MiB for a batch's activations and the CUDA libraries' workspaces."""
    cfg = Config.from_dict(
        {
            "model": "resnet18",
            "data": "synthetic:3x32x32:10:64",
            "workers": 0,
            "device": DEVICE,
            "batch_size": 16,
            "sample_epochs": 1,
            "snapshot_every": 1,
            "dim": 4,
            "subspace_batch_size": 16,
            "subspace_epochs": 1,
            "run_dir": str(tmp_path / "run"),
        }
    )
    run = phases.start_run(cfg, progress=False)
    phases.sample(run)
    phases.basis(run)
    memory = phases.train(run)["memory"][0]
    model_bytes = 4 * memory["basis_rows"]
    assert memory["basis_bytes"] == model_bytes * 4 and memory["basis_rows"] > 11_000_000
    if DEVICE == "cuda":
        bound = memory["basis_bytes"] + 8 * model_bytes + (128 << 20)
        assert memory["basis_bytes"] < memory["peak_cuda_bytes"] <= bound, (memory, bound)
    else:
        assert memory["peak_cuda_bytes"] is None and memory["peak_rss_bytes"] > memory["basis_bytes"]
