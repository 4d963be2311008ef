"""PNG figures of a run, drawn without pyplot so no display or global state is needed."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from matplotlib.figure import Figure

_COLORS = {"sample": "tab:blue", "train": "tab:orange"}


def png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    return buf.getvalue()


def explained_variance(eigvals: np.ndarray, dim: int) -> bytes:
    """Cumulative share of the trajectory's variance, and each direction's share on a log scale."""
    share = eigvals / eigvals.sum()
    ratio = np.cumsum(share)
    k = np.arange(1, len(share) + 1)
    fig = Figure(figsize=(9, 3.5))
    ax_cum, ax_each = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    ax_cum.plot(k, ratio, marker=".")
    ax_cum.set(
        xlabel="number of principal directions",
        ylabel="explained variance ratio",
        ylim=(0, 1.02),
        title="DLDR: variance of the SGD trajectory",
    )
    positive = share > 0
    ax_each.semilogy(k[positive], share[positive], marker=".")
    ax_each.set(xlabel="principal direction", ylabel="share of the variance")
    for ax in (ax_cum, ax_each):
        ax.axvline(dim, color="gray", linestyle="--", label=f"d = {dim}: {ratio[dim - 1]:.6f}")
        ax.grid(alpha=0.3)
        ax.legend()
    return png(fig)


def curves(records: list[dict[str, Any]]) -> bytes:
    """Training loss and test accuracy per epoch, the phases one after the other."""
    fig = Figure(figsize=(9, 3.5))
    ax_loss, ax_acc = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    offset = 0
    for phase, color in _COLORS.items():
        rows = [r for r in records if r["phase"] == phase and "epoch" in r]
        if not rows:
            continue
        x = [offset + r["epoch"] for r in rows]
        label = phase if phase == "sample" else f"train ({rows[0].get('optimizer', '')})"
        ax_loss.plot(x, [r["train_loss"] for r in rows], color=color, marker=".", label=label)
        ax_acc.plot(x, [r["test_accuracy"] for r in rows], color=color, marker=".", label=label)
        offset = x[-1]
    ax_loss.set(xlabel="epoch", ylabel="training loss", yscale="log")
    ax_acc.set(xlabel="epoch", ylabel="test accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    return png(fig)
