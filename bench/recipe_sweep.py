"""The recipe's learning rate, beta2 and schedule, chosen by measurement at one budget.

On the default world (``--arch``, default early fusion; the default mixture, 2 x 256 tokens
per step), for each
ladder size of ``--sizes``: the validation loss after ``--tokens`` tokens at learning rates
``lr(N) x --mults`` (lr(N) = lr_ref (N / n_ref)^lr_exponent of params.yaml; each size's best lr
is the minimum of a parabola in log lr through them), then at the power law through the best
ones AdamW beta2 0.95 against 0.99, then (``--cosine``) the wsd schedule (constant + 1-sqrt
cooldown) against a cosine one at the smallest and largest size. Prints a table and the lr
power law through each size's best lr (what params.yaml's lr_ref and lr_exponent should be).

    python bench/recipe_sweep.py [--arch early] [--sizes xxs xs s m] [--tokens 300000]
                                 [--lr-only | --cosine]

``--arch late`` (or early-moe, early-moe-aware) asks whether the lr law fitted on early fusion
is near each other arch's optimum too (``--lr-only``: the lr table and its power law only).

Two processes, one thread each; ~5 min on the 2-core machine for the defaults.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.long_tail import prepare  # noqa: E402
from flows.config import Point, RunConfig  # noqa: E402
from flows.training.point import train_point  # noqa: E402
from stages.common.stage import run_per_kind  # noqa: E402
from stages.data.shard_format import load_info  # noqa: E402
from stages.params import study_params  # noqa: E402

OUT = ROOT / "bench" / "out" / "recipe"
BASE = {"batch_rows_ref": 2, "batch_exponent": 0.0, "eval_every_tokens": 10**9,
        "log_every_steps": 10}  # fmt: skip


def train(
    arch: str, size: str, tokens: int, train: dict, shards: str, work: str, seed: int = 0
) -> dict:
    cfg = config(arch, size, tokens, train, shards, seed)
    rec = train_point(cfg, shards=Path(shards), codebook=None, workdir=Path(work))
    return {"arch": arch, "size": size, "seed": seed, **train, "loss_avg": rec["loss_avg"],
            "N": rec["N"], "lr": cfg.schedule.lr}  # fmt: skip


def config(arch: str, size: str, tokens: int, train: dict, shards: str, seed: int = 0) -> RunConfig:
    """The point's run config under params.yaml with ``train`` overrides (flows/config.py: the
    one place the lr law is computed)."""
    params = study_params({"train": {**BASE, **train}})
    return RunConfig.build(params, Point(arch, size, tokens, "45-45-10", seed), load_info(shards))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="early", choices=["early", "late", "early-moe",
                    "early-moe-aware"], help="(default %(default)s; discrete needs a codebook)")  # fmt: skip
    ap.add_argument("--sizes", nargs="+", default=["xxs", "xs", "s", "m"])
    ap.add_argument("--tokens", type=int, default=300_000)
    ap.add_argument("--seed", type=int, default=0, help="init and data order (default 0)")
    ap.add_argument("--mults", nargs="+", type=float, default=[0.5, 1.0, 2.0, 4.0])
    how = ap.add_mutually_exclusive_group()
    how.add_argument("--cosine", action="store_true", help="also wsd against cosine")
    how.add_argument("--lr-only", action="store_true", help="the lr sweep only (no beta2 runs)")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    _, shards = prepare(args.out / "world", {})
    tp = study_params().train
    work = str(args.out / "runs")
    jobs = [(args.arch, s, args.tokens, {"lr_ref": tp.lr_ref * m}, str(shards), work, args.seed)
            for s in args.sizes for m in args.mults]  # fmt: skip
    lr_runs = run_per_kind(train, jobs, workers=2)
    n = {r["size"]: r["N"] for r in lr_runs}  # the arch's N (active parameters for MoE)
    lr = {s: config(args.arch, s, args.tokens, {}, str(shards)).schedule.lr for s in args.sizes}
    print(f"{args.arch}, seed {args.seed}: validation loss (avg of kinds) after {args.tokens:,} tokens; "
          "lr = lr(N) x mult")  # fmt: skip
    print(f"{'size':>5} {'N':>8} {'lr(N)':>9} " + " ".join(f"x{m:<6g}" for m in args.mults))
    best = {}
    x = np.log2(args.mults)
    for s in args.sizes:
        losses = [r["loss_avg"] for r in lr_runs if r["size"] == s]
        a, b, _ = np.polyfit(x, losses, 2)  # the optimum of a parabola in log lr, in range
        xm = float(np.clip(-b / (2 * a), x.min(), x.max())) if a > 0 else x[np.argmin(losses)]
        best[s] = lr[s] * 2**xm
        print(f"{s:>5} {n[s]:>8,} {lr[s]:>9.2e} " + " ".join(f"{v:<7.4f}" for v in losses))
    slope, icpt = np.polyfit(np.log([n[s] / tp.n_ref for s in args.sizes]),
                             np.log([best[s] for s in args.sizes]), 1)  # fmt: skip
    print(f"best lr per size: {', '.join(f'{s} {best[s]:.2e}' for s in args.sizes)}; "
          f"through them: lr = {np.exp(icpt):.2e} (N/{tp.n_ref:g})^{slope:.3f}")  # fmt: skip
    lr_ref, lr_exp = float(np.exp(icpt)), float(slope)
    out = {"arch": args.arch, "tokens": args.tokens, "lr_runs": lr_runs, "best_lr": best,
           "lr_ref": lr_ref, "lr_exponent": lr_exp}  # fmt: skip
    if args.lr_only:
        name = f"sweep-{args.arch}-lr" + (f"-seed{args.seed}" if args.seed else "")
        (args.out / f"{name}.json").write_text(json.dumps(out, indent=1))
        return
    jobs = [(args.arch, s, args.tokens, {"lr_ref": lr_ref, "lr_exponent": lr_exp, "adam_beta2": b2},
             str(shards), work, args.seed) for s in args.sizes for b2 in (0.95, 0.99)]  # fmt: skip
    b2_runs = run_per_kind(train, jobs, workers=2)
    print("beta2 at the fitted lr: " + "; ".join(
        f"{s}: 0.95 {b2_runs[2 * i]['loss_avg']:.4f}, 0.99 {b2_runs[2 * i + 1]['loss_avg']:.4f}"
        for i, s in enumerate(args.sizes)))  # fmt: skip
    out["beta2_runs"] = b2_runs
    if args.cosine:
        ends = [args.sizes[0], args.sizes[-1]]
        common = {"lr_ref": lr_ref, "lr_exponent": lr_exp, "branch_cooldowns": False}
        jobs = [(args.arch, s, args.tokens, {**common, "schedule": sched}, str(shards), work, args.seed)
                for s in ends for sched in ("wsd", "cosine")]  # fmt: skip
        cos = run_per_kind(train, jobs, workers=2)
        for i, s in enumerate(ends):
            w, c = cos[2 * i]["loss_avg"], cos[2 * i + 1]["loss_avg"]
            print(f"{s}: wsd {w:.4f}, cosine {c:.4f}: wsd - cosine = {(w - c) / c:+.2%}")
        out["cosine_runs"] = cos
    name = "sweep.json" if args.arch == "early" else f"sweep-{args.arch}.json"
    (args.out / name).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
