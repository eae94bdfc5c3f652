"""Which device a point trains on, how many points run at once, the CPU kernels it uses, and
the peak FLOP/s for MFU.

One place for device choice (``train.device``: ``auto`` takes a GPU when one is visible):
:func:`choose_device` in the point process, :func:`device_slots` in the grid (one slot per GPU,
or ``grid.workers`` CPU slots). torch is imported only when a device is chosen.

**The same numbers on another CPU.** ATen, MKL and oneDNN pick their code paths by the CPU's
instruction set: a machine with AVX-512 rounds differently from one with only AVX2, and a
training run amplifies the rounding to about the run-to-run noise (docs/grid.md, "The same
numbers on another machine"). The grid therefore starts every point process with the AVX2 paths
pinned (:data:`CPU_KERNELS`, :func:`cpu_kernel_env`) on any x86 CPU that has AVX2, unless the
user set those variables (theirs are kept); each record says which kernels ran
(:func:`cpu_kernels`).
"""

from __future__ import annotations

import functools
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

# The AVX2 code paths, set in every point process's environment where the CPU has AVX2: ATen's
# vectorised kernels, MKL's BLAS in its conditional-numerical-reproducibility mode (one code path
# whatever the processor), oneDNN. On an AVX-512 machine they replace the wider kernels. On the
# AVX2 development machine ATen's and oneDNN's are what runs anyway, and dense points' losses
# were the same to the last bit; MKL's default path there differed for the MoE experts'
# products, so MoE points' losses moved (docs/grid.md, "The same numbers on another machine").
CPU_KERNELS = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def cpu_kernel_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The variables of :data:`CPU_KERNELS` to add to a point process's environment: none that
    ``environ`` (default: this process's) sets already, and none on a CPU without AVX2 (ARM,
    older x86), where they do not apply."""
    environ = os.environ if environ is None else environ
    if _cpu_capability() not in ("AVX2", "AVX512"):
        return {}
    return {k: v for k, v in CPU_KERNELS.items() if k not in environ}


@functools.cache
def _cpu_capability() -> str:
    """The widest kernels ATen can use on this CPU (``AVX512``, ``AVX2``, ``DEFAULT``, ...)."""
    import torch

    return torch.backends.cpu.get_cpu_capability()


def cpu_kernels() -> str:
    """The CPU kernels this process runs, for its record: ATen's capability and the MKL and
    oneDNN settings (``AVX2 (MKL_CBWR=AVX2, ONEDNN_MAX_CPU_ISA=AVX2)``; ``native``: not set)."""
    libs = [k for k in CPU_KERNELS if k != "ATEN_CPU_CAPABILITY"]
    rest = ", ".join(f"{k}={os.environ.get(k, 'native')}" for k in libs)
    return f"{_cpu_capability()} ({rest})"


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
