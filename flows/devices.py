"""Which device a point trains on, how many points run at once, and the peak FLOP/s for MFU.

One place for device choice (``train.device``: ``auto`` takes a GPU when one is visible):
:func:`choose_device` in the point process, :func:`device_slots` in the grid (one slot per GPU,
or ``grid.workers`` CPU slots). torch is imported only when a device is chosen.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from stages.params import Params, ParamsError

if TYPE_CHECKING:
    import torch

# Peak dense FLOP/s per device for MFU. CPU: the fp32 single-thread 256x256 matmul ceiling
# measured on the 2-core development machine, times the threads used.
PEAK_FLOPS = {
    "cpu-thread": 38e9,
    "NVIDIA H100 80GB HBM3": 989e12,  # bf16 dense, SXM
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
}


def choose_device(want: str) -> torch.device:
    """``cpu``, ``cuda``, or for ``auto`` a GPU when one is visible, else the CPU."""
    import torch

    if want == "cuda" and not torch.cuda.is_available():
        raise ParamsError("train.device is 'cuda' but no GPU is visible")
    cuda = want == "cuda" or (want == "auto" and torch.cuda.is_available())
    return torch.device("cuda" if cuda else "cpu")


def device_slots(params: Params) -> list[str | None]:
    """One entry per point that may run at once: its GPU ids (``train.processes`` of them,
    comma-separated), or None (CPU)."""
    workers, want = params.grid.workers, params.train.device
    if want == "cpu":
        return [None] * workers
    import torch

    n = torch.cuda.device_count()
    if n == 0:
        if want == "cuda":
            raise ParamsError("train.device is 'cuda' but no GPU is visible")
        return [None] * workers
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [s.strip() for s in visible.split(",")] if visible else [str(i) for i in range(n)]
    per = params.train.processes  # GPUs per point (torchrun): "0,1", "2,3", ...
    if per > len(ids):
        raise ParamsError(f"train.processes={per} but only {len(ids)} GPU(s) are visible")
    return [",".join(ids[i * per : (i + 1) * per]) for i in range(min(workers, len(ids) // per))]


def peak_flops(device: torch.device, threads: int) -> float:
    """Dense peak FLOP/s of ``device`` (NaN for an unknown GPU)."""
    if device.type == "cuda":
        import torch

        name = torch.cuda.get_device_name(device)
        return next((v for k, v in PEAK_FLOPS.items() if name.startswith(k)), float("nan"))
    return PEAK_FLOPS["cpu-thread"] * threads
