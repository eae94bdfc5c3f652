"""Training-step speed of the four architectures on one CPU thread, side by side.

Prints, at each size (default: the ladder's smallest and a mid size):
- tokens/s of a full step (forward, backward, AdamW) per architecture;
- MoE step time / dense step time with equal active parameters (target <= 1.5);
- our dense (early) step / a minimal nanoGPT-style reference step of the same dimensions
  written here (LayerNorm, GELU MLP of 4d, learned positions, causal SDPA; target <= 1.1).

    python bench/model_speed.py [--sizes xxs m] [--batch 16] [--context 256] [--steps 8]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.loader_throughput import ensure_shards  # noqa: E402
from bench.tiny_model import Block as RefBlock  # noqa: E402
from model.config import ModelConfig, MoEConfig  # noqa: E402
from model.counting import count_params  # noqa: E402
from model.discrete import VisualCodebook  # noqa: E402
from model.model import MultimodalLM  # noqa: E402
from model.sizes import size_config  # noqa: E402
from stages.data.loader import PackedLoader  # noqa: E402
from stages.data.shard_format import load_info  # noqa: E402


class NanoGPT(nn.Module):
    """The reference: nanoGPT's model.py reduced to what a step needs (text tokens only)."""

    def __init__(self, vocab: int, ctx: int, d: int, n_layer: int, n_head: int):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(ctx, d)
        self.blocks = nn.ModuleList(RefBlock(d, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, b) -> torch.Tensor:
        x = self.wte(b.tokens) + self.wpe(torch.arange(b.tokens.shape[1]))
        for blk in self.blocks:
            x = blk(x)
        m = b.loss_mask.bool()
        return F.cross_entropy(self.head(self.ln_f(x)[m]), b.targets[m])


def step_time(model: nn.Module, batches: list, loss_fn) -> float:
    """Median seconds per optimizer step (after two warm-up steps)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times = []
    for i, b in enumerate(batches):
        t0 = time.perf_counter()
        loss_fn(model, b).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", nargs="+", default=["xxs", "m"])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--shards", type=Path, default=ROOT / "data" / "shards")
    args = ap.parse_args()
    torch.set_num_threads(1)
    shards = ensure_shards(args.shards)
    info = load_info(shards)
    mix = {"caption": 0.45, "interleaved": 0.45, "text": 0.10}
    loader = PackedLoader(shards, args.batch, args.context, mix, seed=0)
    batches = [loader.next_batch() for _ in range(args.steps + 2)]
    tokens = args.batch * args.context
    base = ModelConfig(
        vocab_size=info["vocab_size"],
        context_length=args.context,
        image_size=info["image_size"],
        patch_size=info["patch_size"],
        special_ids=info["special_ids"],
    )
    ours = lambda m, b: m(b).total  # noqa: E731
    print(f"1 thread, batch {args.batch} x context {args.context}, median of {args.steps} steps")
    for size in args.sizes:
        results = {}
        for name, kw in {
            "early": dict(arch="early"),
            "late": dict(arch="late"),
            "discrete": dict(arch="discrete"),
            "early-moe": dict(arch="early", moe=MoEConfig()),
        }.items():
            torch.manual_seed(0)
            cfg = size_config(size, base, **kw)
            cb = None
            if cfg.arch == "discrete":
                cb = VisualCodebook(
                    torch.rand(cfg.codebook_size, cfg.patch_dim) * 2 - 1, cfg.patch_size
                )
            results[name] = (step_time(MultimodalLM(cfg, cb), batches, ours), count_params(cfg))
        cfg = size_config(size, base)
        ref = NanoGPT(cfg.total_vocab, args.context, cfg.d_model, cfg.n_layers, cfg.n_heads)
        ref_t = step_time(ref, batches, lambda m, b: m(b))
        print(f"\nsize {size}: d_model {cfg.d_model}, {cfg.n_layers} layers")
        for name, (t, c) in results.items():
            nv = f", N_v {c.N_v:,}" if c.N_v else ""
            print(
                f"  {name:<10} N {c.N:>9,}{nv:<14} {t * 1e3:8.1f} ms/step {tokens / t:10,.0f} tok/s"
            )
        print(
            f"  {'nanoGPT':<10} (reference){'':<17} {ref_t * 1e3:8.1f} ms/step {tokens / ref_t:10,.0f} tok/s"
        )
        moe = results["early-moe"][0] / results["early"][0]
        dense = results["early"][0] / ref_t
        print(f"  MoE / dense (equal active N): {moe:.2f}  (target <= 1.5)")
        print(f"  dense / nanoGPT reference  : {dense:.2f}  (target <= 1.1)")


if __name__ == "__main__":
    main()
