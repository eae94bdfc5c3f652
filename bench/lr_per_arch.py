"""An lr per arch: the lr law refitted through each arch's best lr per size, at two seeds.

The lr law of params.yaml (lr = lr_ref (N / n_ref)^lr_exponent) was fitted on early fusion at
the old ladder (bench/recipe_sweep.py). Here every arch of ``--archs`` trains at ``--sizes`` x
``--mults`` x ``--seeds`` for ``--tokens`` tokens with lr = lr(N) x mult (the default world with
``--scale`` times its documents, the default mixture; lr(N) is the law of ``--lr-ref`` and
``--lr-exponent``, params.yaml's by default, without ``train.lr_arch_mult``). Per (arch, size),
the best mult is the minimum of a parabola in log2 mult through the seeds' mean losses (clipped
to the mults swept), flagged as not bracketed when it or the lowest mean lies at an end of them.
One law goes through every best lr: a slope shared by the archs and a
factor per arch (least squares in log lr), which is what params.yaml's ``train.lr_ref``,
``lr_exponent`` and ``lr_arch_mult`` take. Prints the table (also ``lr_per_arch.md``, for
docs/recipe.md) and the law; writes ``lr_per_arch.json`` under ``--out``. Runs are kept under
``--out``: a second call with more mults or archs trains only the new ones.

    python bench/lr_per_arch.py [--archs early late early-moe] [--sizes w16d4 xxs xs]
                                [--mults 0.25 0.5 1 2] [--seeds 0 1] [--tokens 300000]
                                [--lr-ref 5.5e-3 --lr-exponent -0.9]

docs/recipe.md's table: ``--archs early late early-moe discrete early-moe-aware --lr-ref 5.5e-3
--lr-exponent -0.9`` (the law before the refit it led to).

Two processes, one thread each: the defaults train 72 points, ~8 min on the 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.isoflop import world  # noqa: E402
from bench.long_tail import prepare  # noqa: E402
from bench.recipe_sweep import config  # noqa: E402
from flows.training.point import train_point  # noqa: E402
from stages.common.stage import run_per_kind  # noqa: E402
from stages.params import ARCHS, study_params  # noqa: E402

OUT = ROOT / "bench" / "out" / "lr_per_arch"


def train(arch: str, size: str, tokens: int, over: dict, shards: str, work: str, seed: int,
          codebook: str | None) -> dict:  # fmt: skip
    cfg = config(arch, size, tokens, over, shards, seed)
    rec = train_point(cfg, shards=Path(shards), codebook=Path(codebook) if codebook else None,
                      workdir=Path(work))  # fmt: skip
    return {"arch": arch, "size": size, "seed": seed, **over, "loss_avg": rec["loss_avg"],
            "N": rec["N"], "lr": cfg.schedule.lr}  # fmt: skip


def codebook_for(shards: Path) -> Path:
    """The codebook of the default params on these shards (made once, for discrete)."""
    from stages.data.codebook import build_codebook

    path = shards.parent / "codebook" / "codebook.pt"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        build_codebook(shards, study_params().codebook)[0].save(path)
    return path


def best_mult(mults: list[float], losses: list[float]) -> tuple[float, bool]:
    """The mult at the minimum of a parabola in log2 mult through the losses (clipped to the
    swept range), and whether it lies at an end of that range (the sweep does not bracket it)."""
    x = np.log2(mults)
    a, b, _ = np.polyfit(x, losses, 2)
    low = int(np.argmin(losses))
    xm = -b / (2 * a) if a > 0 else x[low]
    clipped = float(np.clip(xm, x.min(), x.max()))
    # bracketed only when a mult inside has the lowest loss and the minimum lies among them
    edge = clipped in (x.min(), x.max()) or low in (0, len(x) - 1)
    return float(2**clipped), bool(edge)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--archs", nargs="+", default=["early", "late", "early-moe"])
    ap.add_argument("--sizes", nargs="+", default=["w16d4", "xxs", "xs"])
    ap.add_argument("--mults", nargs="+", type=float, default=[0.25, 0.5, 1.0, 2.0])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--tokens", type=int, default=300_000)
    ap.add_argument("--lr-ref", type=float, default=None,
                    help="the law swept around (default: params.yaml's train.lr_ref)")  # fmt: skip
    ap.add_argument("--lr-exponent", type=float, default=None,
                    help="(default: params.yaml's train.lr_exponent)")  # fmt: skip
    ap.add_argument("--scale", type=float, default=0.25,
                    help="corpus size x the default's (a quarter holds 300k tokens many times)")  # fmt: skip
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    _, shards = prepare(args.out / "world", {"corpus": {"synthetic": world(args.scale)}})
    tp = study_params().train
    base = tp.model_copy(update={"lr_ref": args.lr_ref or tp.lr_ref,
                                 "lr_exponent": tp.lr_exponent if args.lr_exponent is None
                                 else args.lr_exponent})  # fmt: skip
    work = str(args.out / "runs")
    cb = str(codebook_for(shards)) if "discrete" in args.archs else None
    ones = {a: 1.0 for a in ARCHS}  # the sweep's own multiples replace params' factors
    jobs = [(a, s, args.tokens, {"lr_ref": base.lr_ref * m, "lr_exponent": base.lr_exponent,
                                 "lr_arch_mult": ones}, str(shards), work, sd,
             cb if a == "discrete" else None)
            for a in args.archs for s in args.sizes for sd in args.seeds for m in args.mults]  # fmt: skip
    runs = run_per_kind(train, jobs, workers=2)
    result = analyse(runs, args.mults, base)
    result["tokens"] = args.tokens
    print(f"validation loss (avg of kinds) after {args.tokens:,} tokens, lr = lr(N) x mult\n")
    print(result["markdown"])
    (args.out / "lr_per_arch.md").write_text(result["markdown"] + "\n")
    (args.out / "lr_per_arch.json").write_text(json.dumps({**result, "runs": runs}, indent=1))


def analyse(runs: list[dict], mults: list[float], tp) -> dict:
    """Per (arch, size): the seeds' mean loss at each mult and the best mult (a parabola in log2
    mult through those means, :func:`best_mult`). Then one lr law through every best lr, a slope
    shared by the archs and a factor per arch: log lr* = log lr_ref + e log(N / n_ref) + log f_arch,
    by least squares (f = 1 for the first arch, whose lr_ref it is; points at an end of the sweep
    count as they are, flagged)."""
    df = pd.DataFrame(runs)
    df["mult"] = df["lr_ref"] / tp.lr_ref
    archs = list(dict.fromkeys(df.arch))
    rows = []
    for (arch, size), g in df.groupby(["arch", "size"], sort=False):
        mean = g.groupby("mult")["loss_avg"].mean().reindex(mults)
        best, edge = best_mult(mults, mean.tolist())
        lr1 = float(g[g.mult == 1.0].lr.iloc[0]) if (g.mult == 1.0).any() else float(
            g.lr.iloc[0] / g.mult.iloc[0])  # fmt: skip
        rows.append({"arch": arch, "size": size, "N": int(g.N.iloc[0]), "seeds": int(g.seed.nunique()),
                     "loss": mean.tolist(), "best_mult": best, "at_edge": edge,
                     "lr_law": lr1, "best_lr": lr1 * best})  # fmt: skip
    X = np.array([[1.0, math.log(r["N"] / tp.n_ref)] + [float(r["arch"] == a) for a in archs[1:]]
                  for r in rows])  # fmt: skip
    y = np.log([r["best_lr"] for r in rows])
    coef, *_ = np.linalg.lstsq(X, y, rcond=None)
    resid = y - X @ coef
    law = {"lr_ref": float(np.exp(coef[0])), "lr_exponent": float(coef[1]),
           "lr_arch_mult": {a: float(np.exp(c)) for a, c in zip(archs[1:], coef[2:], strict=True)},
           "first_arch": archs[0], "residual_sd_log2": float(np.std(resid / math.log(2), ddof=0))}  # fmt: skip
    k = len(mults)
    lines = ["| arch | size | N | " + " | ".join(f"x{m:g}" for m in mults) + " | best mult |",
             "|---|---|---|" + "---|" * (k + 1)]  # fmt: skip
    for r in rows:
        cells = " | ".join(f"**{v:.4f}**" if v == min(r["loss"]) else f"{v:.4f}" for v in r["loss"])
        lines.append(f"| {r['arch']} | {r['size']} | {r['N']:,} | {cells} | {r['best_mult']:.2f}"
                     f"{' (edge)' if r['at_edge'] else ''} |")  # fmt: skip
    lines += ["", f"Through the best lrs (a slope shared by the archs): lr = {law['lr_ref']:.3g} "
              f"(N/{tp.n_ref:g})^{law['lr_exponent']:.3f} x f(arch), f = "
              + ", ".join([f"{archs[0]} 1"] + [f"{a} {v:.2f}" for a, v in law["lr_arch_mult"].items()])
              + f"; residual sd {law['residual_sd_log2']:.2f} in log2 lr; "
              f"{sum(r['at_edge'] for r in rows)}/{len(rows)} optima at an end of the sweep."]  # fmt: skip
    return {"mults": mults, "rows": rows, "law": law, "markdown": "\n".join(lines)}


if __name__ == "__main__":
    main()
