"""Does the synthetic task reward looking, size and tokens? A quick check with tiny models.

Trains the bench's nanoGPT-style early-fusion model (bench/tiny_model.py) at a few widths on
the default shards, one CPU thread per process, and prints the validation loss per data kind
at several token budgets beside the corpus's entropy floor (data/shards/info.json). Then, for
the widest model, the caption loss with the images blanked: if it rises, the text depends on
the image and the model uses it. This is a sanity check of the data, not the study (the grid
flow trains the real models).

    python bench/task_headroom.py [--widths 32 64 128] [--steps 300] [--evals 3]
"""

from __future__ import annotations

import argparse
import sys
from concurrent.futures import ProcessPoolExecutor
from itertools import islice
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.tiny_model import TinyEarlyFusion  # noqa: E402
from stages.data.kinds import KINDS  # noqa: E402
from stages.data.loader import PackedLoader, val_batches  # noqa: E402
from stages.data.shard_format import load_info  # noqa: E402

SHARDS = ROOT / "data" / "shards"
B, L, VAL_BATCHES = 16, 128, 15


def set_shards(path: Path) -> None:
    global SHARDS
    SHARDS = path


@torch.no_grad()
def evaluate(model, blank_images: bool = False) -> dict[str, float]:
    model.eval()
    out = {}
    for kind in KINDS:
        tot = n = 0.0
        for b in islice(val_batches(SHARDS, kind, B, L), VAL_BATCHES):
            if blank_images:
                b.images.zero_()
            m = b.loss_mask.sum().item()
            tot += model(b).item() * m
            n += m
        out[kind] = tot / max(n, 1)
    model.train()
    return out


def train(width: int, steps: int, evals: int, shards: Path) -> dict:
    set_shards(shards)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    info = load_info(SHARDS)
    model = TinyEarlyFusion(info["vocab_size"], info["patch_size"], L, d=width, n_head=4)
    n = sum(p.numel() for p in model.parameters() if p is not model.wte.weight)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95), weight_decay=0.0)
    mix = {"caption": 0.45, "interleaved": 0.45, "text": 0.10}
    loader = PackedLoader(SHARDS, B, L, mix, seed=0)
    curve, marks = [], {steps * (i + 1) // evals for i in range(evals)}
    for step in range(1, steps + 1):
        lr = 2e-3 * min(1.0, step / 30) * min(1.0, (steps - step) / (0.2 * steps) + 1e-3)
        for g in opt.param_groups:
            g["lr"] = lr
        loss = model(loader.next_batch())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step in marks:
            curve.append((step * B * L, evaluate(model)))
    return {"width": width, "params": n, "curve": curve, "blank": evaluate(model, True)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--widths", type=int, nargs="+", default=[32, 64, 128])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--evals", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--shards", type=Path, default=SHARDS)
    args = ap.parse_args()
    set_shards(args.shards)
    info = load_info(SHARDS)
    floor = {k: info["totals"][f"val/{k}"]["floor_nats_per_token"] for k in KINDS}
    with ProcessPoolExecutor(args.workers) as pool:
        jobs = [pool.submit(train, w, args.steps, args.evals, args.shards) for w in args.widths]
        results = [j.result() for j in jobs]
    print(f"val loss (nats/token), batch {B} x {L}; the floor is the text entropy given images")
    print(f"{'width':>5} {'params':>8} {'tokens':>9}  " + "  ".join(f"{k:>11}" for k in KINDS))
    print(f"{'':>5} {'':>8} {'floor':>9}  " + "  ".join(f"{floor[k]:>11.3f}" for k in KINDS))
    for r in results:
        for tokens, losses in r["curve"]:
            cells = "  ".join(f"{losses[k]:>11.3f}" for k in KINDS)
            print(f"{r['width']:>5} {r['params']:>8,} {tokens:>9,}  {cells}")
    last = results[-1]
    seen, blank = last["curve"][-1][1]["caption"], last["blank"]["caption"]
    print(f"width {last['width']}: caption loss {seen:.3f} with images, {blank:.3f} blanked")


if __name__ == "__main__":
    main()
