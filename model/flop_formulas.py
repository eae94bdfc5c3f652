"""FLOP formulas that torch 2.13's ``FlopCounterMode`` lacks, registered only when asked.

``FlopCounterMode`` (torch.utils.flop_counter) is how the tests and benchmarks check
model/counting.py against what actually runs. It counts the CUDA SDPA kernels but not the CPU
one, and has no formula for ``torch._grouped_mm`` (model/moe.py's experts), so it would count
attention on CPU and the MoE experts as 0 FLOPs. :func:`register_flop_formulas` adds both,
once; nothing is registered at import (it changes a global registry of torch's).
"""

from __future__ import annotations

import math

import torch
from torch.utils import flop_counter as fcm


def grouped_mm_flop(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """2*M*K*N summed over groups. 2-D x 2-D (weight grad): offs splits the contraction dim."""
    if len(a_shape) == 2 and len(b_shape) == 2:
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]
    return 2 * math.prod(out_shape) * a_shape[-1]


def _sdpa_cpu(q, k, v, *args, out_shape=None, **kwargs) -> int:
    return fcm.sdpa_flop_count(q, k, v)


def _sdpa_cpu_backward(grad_out, q, k, v, *args, out_shape=None, **kwargs) -> int:
    return fcm.sdpa_backward_flop_count(grad_out, q, k, v)


def register_flop_formulas() -> None:
    """Teach ``FlopCounterMode`` the MoE grouped matmul and CPU attention (idempotent)."""
    aten = torch.ops.aten
    formulas = {
        "_grouped_mm": grouped_mm_flop,
        "_scaled_dot_product_flash_attention_for_cpu": _sdpa_cpu,
        "_scaled_dot_product_flash_attention_for_cpu_backward": _sdpa_cpu_backward,
    }
    for name, formula in formulas.items():
        op = getattr(aten, name, None)
        if op is not None and op not in fcm.flop_registry:
            fcm.register_flop_formula(op)(formula)
