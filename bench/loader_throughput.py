"""Loader throughput beside the training throughput of a ~100k-parameter model, one CPU thread.

The loader must be >= 10x faster than training so data never bounds a run. Both are measured
side by side in this process (machines here are noisy: compare the ratio, not absolute numbers).

    python bench/loader_throughput.py [--shards data/shards] [--batch 16] [--context 256]

Without ``data/shards`` (run ``make repro`` first) it builds a small corpus in bench/out/.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stages.loader import Batch, PackedLoader  # noqa: E402
from stages.shard_format import load_info  # noqa: E402


class Block(nn.Module):
    def __init__(self, d: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.mlp(self.ln2(x))


class TinyEarlyFusion(nn.Module):
    """nanoGPT-style decoder with image patches projected in place of <image> tokens."""

    def __init__(
        self, vocab: int, patch: int, ctx: int, d: int = 32, n_layer: int = 5, n_head: int = 4
    ):
        super().__init__()
        self.patch = patch
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(ctx, d)
        self.patch_proj = nn.Linear(3 * patch * patch, d)
        self.blocks = nn.ModuleList(Block(d, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d)

    def forward(self, b: Batch) -> torch.Tensor:
        x = self.wte(b.tokens) + self.wpe(b.positions)
        if len(b.images):
            p = self.patch
            img = b.images.float() / 255.0  # (M, 3, S, S)
            patches = img.unfold(2, p, p).unfold(3, p, p)  # (M, 3, S/p, S/p, p, p)
            patches = patches.permute(0, 2, 3, 1, 4, 5).flatten(3).flatten(1, 2)  # (M, T, 3pp)
            emb = self.patch_proj(patches)
            T = emb.shape[1]
            rows = b.image_index[:, 0:1].expand(-1, T)
            cols = b.image_index[:, 1:2] + torch.arange(T)
            x = x.index_put((rows, cols), emb)
        for blk in self.blocks:
            x = blk(x)
        logits = self.ln_f(x) @ self.wte.weight.T
        loss = F.cross_entropy(logits.flatten(0, 1), b.targets.flatten(), reduction="none")
        return (loss * b.loss_mask.flatten()).sum() / b.loss_mask.sum().clamp(min=1)


def ensure_shards(shards: Path) -> Path:
    if (shards / "manifest.parquet").exists():
        return shards
    from tests.conftest import build_data

    out = ROOT / "bench" / "out" / "loader"
    raw = {"corpus": {"synthetic": {"n_caption": 4000, "n_interleaved": 1000, "n_text": 2000}}}
    return build_data(out, raw).shards if not (out / "shards").exists() else out / "shards"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shards", type=Path, default=ROOT / "data" / "shards")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--loader-steps", type=int, default=400)
    ap.add_argument("--train-steps", type=int, default=30)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    shards = ensure_shards(args.shards)
    info = load_info(shards)
    mix = {"caption": 0.45, "interleaved": 0.45, "text": 0.10}
    mk = lambda: PackedLoader(shards, args.batch, args.context, mix, seed=0)  # noqa: E731

    loader = mk()
    t0 = time.perf_counter()
    batches = [loader.next_batch() for _ in range(args.loader_steps)]
    loader_tps = args.loader_steps * args.batch * args.context / (time.perf_counter() - t0)

    model = TinyEarlyFusion(info["vocab_size"], info["patch_size"], args.context)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for b in batches[:3]:  # warm up
        model(b).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    for b in batches[3 : 3 + args.train_steps]:
        loss = model(b)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    train_tps = args.train_steps * args.batch * args.context / (time.perf_counter() - t0)

    print(f"shards: {shards}  batch {args.batch} x context {args.context}, 1 thread")
    print(f"loader throughput       : {loader_tps:12,.0f} tokens/s  ({args.loader_steps} batches)")
    print(f"train step ({n_params:,} params): {train_tps:12,.0f} tokens/s  (final loss {loss:.3f})")
    ratio = loader_tps / train_tps
    print(
        f"loader / train          : {ratio:12.1f}x  (target >= 10x: {'OK' if ratio >= 10 else 'MISSED'})"
    )


if __name__ == "__main__":
    main()
