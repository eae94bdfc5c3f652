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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.tiny_model import TinyEarlyFusion  # noqa: E402
from stages.data.loader import PackedLoader  # noqa: E402
from stages.data.shard_format import load_info  # noqa: E402


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
