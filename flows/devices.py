"""Which device a point trains on, how many points run at once, and the peak FLOP/s for MFU.

One place for device choice (``train.device``: ``auto`` takes a GPU when one is visible):
:func:`choose_device` in the point process, :func:`device_slots` in the grid (one slot per GPU,
or ``grid.workers`` CPU slots). torch is imported only when a device is chosen.
"""

from __future__ import annotations

import logging
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


log = logging.getLogger(__name__)


def torch_build() -> str:
    """This torch's version and build: ``2.13.0+cpu, a CPU build``, ``2.13.0, CUDA 12.8``."""
    import torch

    if torch.version.cuda:
        return f"{torch.__version__}, CUDA {torch.version.cuda}"
    if getattr(torch.version, "hip", None):
        return f"{torch.__version__}, ROCm {torch.version.hip}"
    return f"{torch.__version__}, a CPU build"


def cuda_unavailable() -> str | None:
    """Why no GPU can be used here (None when one can): a CPU build of torch, no working driver,
    or no device visible."""
    import torch

    if not (torch.version.cuda or getattr(torch.version, "hip", None)):
        return (
            f"this torch is a CPU build ({torch.__version__}): install a CUDA build (`make install` "
            "on a machine with a GPU gets one from the package index)"
        )
    if torch.cuda.is_available():  # (no CUDA context is created here)
        return None
    try:  # no usable GPU: initialising says why (the driver's error), or nothing if none is seen
        torch.cuda.init()
    except Exception as e:  # noqa: BLE001 (torch raises RuntimeError or AssertionError)
        return f"torch ({torch_build()}) cannot use a GPU: {e}"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    hint = f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""
    return f"no GPU is visible{hint}"


def require_cuda() -> None:
    """ParamsError naming why, when ``train.device: cuda`` cannot have a GPU here."""
    why = cuda_unavailable()
    if why:
        raise ParamsError(f"train.device is 'cuda' but {why}; or set train.device: auto | cpu")


def check_attention(attention: str, device_type: str) -> None:
    """ParamsError when ``train.attention: flex`` would train on a CPU: torch's FlexAttention
    has no backward pass there."""
    if attention == "flex" and device_type != "cuda":
        import torch

        raise ParamsError(
            f"train.attention is 'flex' but the points train on the {device_type} here, and "
            f"torch {torch.__version__}'s FlexAttention has no backward pass on a CPU; set "
            "train.attention: sdpa (the same numbers: model/decoder.py)"
        )


def choose_device(want: str) -> torch.device:
    """``cpu``, ``cuda`` (a GPU, or ParamsError naming why there is none), or for ``auto`` a
    GPU when one is usable, else the CPU (logged, with the torch build)."""
    import torch

    if want == "cuda":
        require_cuda()
        return torch.device("cuda")
    if want == "cpu":
        return torch.device("cpu")
    why = cuda_unavailable()
    choice = torch.device("cpu" if why else "cuda")
    log.info("train.device auto: %s (torch %s%s)", choice, torch_build(), f"; {why}" if why else "")
    return choice


def device_slots(params: Params) -> list[str | None]:
    """One entry per point that may run at once: its GPU ids (``train.processes`` of them,
    comma-separated), or None (CPU)."""
    workers, want = params.grid.workers, params.train.device
    if want == "cpu" or (want == "auto" and cuda_unavailable()):
        check_attention(params.train.attention, "cpu")
        return [None] * workers
    import torch

    if want == "cuda":
        require_cuda()
    n = torch.cuda.device_count()
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
