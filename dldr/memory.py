"""Memory as a figure: a process's peak resident memory and peak CUDA memory over one piece of work.

Linux keeps a process's peak resident set (VmHWM) since it started; writing 5 to
/proc/self/clear_refs sets it back to the current size, so each phase of a process reports its
own peak. Where that file cannot be
written, the peak is the process's since it started, which ``peak_rss_reset`` says.
"""

from __future__ import annotations

import torch

STATUS = "/proc/self/status"


def status_bytes(field: str) -> int | None:
    """A memory figure of /proc/self/status: VmRSS (resident now) or VmHWM (its peak); None off Linux."""
    try:
        with open(STATUS) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class Peak:
    """Peak memory from construction to ``figures()``: resident memory and, on a GPU, CUDA memory."""

    def __init__(self, device: torch.device | None = None):
        self.device = device if device is not None and device.type == "cuda" else None
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.reset = True
        except OSError:
            self.reset = False
        if self.device is not None:
            torch.cuda.reset_peak_memory_stats(self.device)

    def figures(self, **held: int) -> dict[str, int | bool | None]:
        """The peaks so far, with ``held``: the bytes of the large arrays the work kept (snapshots, P_r)."""
        cuda = torch.cuda.max_memory_allocated(self.device) if self.device is not None else None
        return {**held, "peak_rss_bytes": status_bytes("VmHWM"), "peak_rss_reset": self.reset, "peak_cuda_bytes": cuda}
