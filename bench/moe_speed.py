"""How much slower is an MoE FFN layer than the dense SwiGLU with the same active parameters?

One CPU thread, one FFN layer on (B=16, L=256) tokens, a training step each (forward, backward
and, by default, an AdamW step): the dense ``SwiGLU`` vs ``MoEFFN`` (8 experts, top-1, same dim
and hidden, so the same active parameters) through each dispatch kernel, and the per-expert
Python loop (the test oracle) for reference. Variants run round-robin in one process, after a
warmup, and the median of the repeats is reported. ``bench_layer`` returns the numbers for a
model-level bench to reuse.

    python bench/moe_speed.py [--dims 64 128 256] [--repeats 7] [--no-opt]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model.config import MoEConfig  # noqa: E402
from model.layers import SwiGLU  # noqa: E402
from model.moe import MoEFFN, grouped_mm_works  # noqa: E402
from tests.model.test_moe import moe_loop  # noqa: E402  (the oracle, one source of truth)

VARIANTS = ("dense", "moe_grouped_mm", "moe_bmm", "moe_loop")


def ffn_hidden(dim: int) -> int:
    """SwiGLU hidden size: 8/3 * dim rounded up to a multiple of 8."""
    return 8 * math.ceil(8 * dim / 3 / 8)


def _step_fn(
    variant: str, dim: int, hidden: int, cfg: MoEConfig, x: torch.Tensor, opt_step: bool
) -> Callable[[], None]:
    torch.manual_seed(0)
    if variant == "dense":
        layer: nn.Module = SwiGLU(dim, hidden)
    else:
        impl = "bmm" if variant == "moe_loop" else variant.removeprefix("moe_")
        layer = MoEFFN(dim, hidden, cfg, impl=impl)
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-4) if opt_step else None

    def step() -> None:
        if variant == "dense":
            y, aux = layer(x), 0.0
        elif variant == "moe_loop":
            y, aux = moe_loop(layer, x), 0.0
        else:
            y, a = layer(x)
            aux = a["aux_loss"]
        loss = y.square().mean() + aux
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        x.grad = None

    return step


def bench_layer(
    dim: int,
    cfg: MoEConfig | None = None,
    batch: int = 16,
    seq: int = 256,
    warmup: int = 2,
    repeats: int = 7,
    opt_step: bool = True,
    variants: tuple[str, ...] = VARIANTS,
) -> dict[str, float]:
    """Median ms per training step of each variant, measured round-robin on one thread.

    Returns {variant: ms} (``moe_grouped_mm`` left out where the kernel is unavailable) and
    ``imbalance``: the busiest expert's tokens / the mean at init (bmm pads to the busiest).
    """
    cfg = cfg or MoEConfig(n_experts=8, top_k=1)
    hidden = ffn_hidden(dim)
    if not grouped_mm_works("cpu", torch.float32):
        variants = tuple(v for v in variants if v != "moe_grouped_mm")
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x = torch.randn(batch, seq, dim, generator=torch.Generator().manual_seed(1))
        x.requires_grad_()  # a layer inside a model also computes dL/dx
        steps = {v: _step_fn(v, dim, hidden, cfg, x, opt_step) for v in variants}
        times: dict[str, list[float]] = {v: [] for v in variants}
        for i in range(warmup + repeats):
            for v, step in steps.items():
                t0 = time.perf_counter()
                step()
                if i >= warmup:
                    times[v].append(1e3 * (time.perf_counter() - t0))
    finally:
        torch.set_num_threads(n_threads)
    torch.manual_seed(0)  # the benchmarked MoE layers' init
    with torch.no_grad():
        load = MoEFFN(dim, hidden, cfg)(x)[1]["load"]
    return {
        **{v: statistics.median(t) for v, t in times.items()},
        "imbalance": load.max().item() * cfg.n_experts,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dims", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--no-opt", action="store_true", help="forward+backward only")
    args = ap.parse_args()
    cfg = MoEConfig(n_experts=8, top_k=1)
    step = "fwd+bwd" if args.no_opt else "fwd+bwd+AdamW"
    print(f"B=16 L=256, {cfg.n_experts} experts top-{cfg.top_k}, 1 thread, {step}, ms/step median")
    cols = ("dim", "hidden", *VARIANTS, "gmm/dense", "bmm/dense", "max/mean load")
    print("".join(f"{c:>15}" for c in cols))
    for dim in args.dims:
        r = bench_layer(
            dim, cfg, warmup=args.warmup, repeats=args.repeats, opt_step=not args.no_opt
        )
        row = [dim, ffn_hidden(dim)] + [r.get(v, float("nan")) for v in VARIANTS]
        row += [r.get("moe_grouped_mm", float("nan")) / r["dense"], r["moe_bmm"] / r["dense"]]
        row += [r["imbalance"]]
        print("".join(f"{c:>15}" if isinstance(c, int) else f"{c:>15.2f}" for c in row), flush=True)


if __name__ == "__main__":
    main()
