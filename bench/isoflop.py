"""Where is the compute optimum of this world, and how large is a size step against the noise?

An IsoFLOP probe (Hoffmann et al. 2022, approach 2) on the default world with early fusion: the
real pipeline (corpus, tokenizer, shards, the grid flow) trains ``--sizes`` x ``--tokens`` at
``--seeds``, on a corpus ``--scale`` times the default's so that no budget reads a document
twice. Then, from the runs alone:

- **IsoFLOP optima**: for each compute C = 6 N D on a log grid, each size's loss at
  D = C / (6 N) is interpolated in log L over log D between its trained budgets; a parabola in
  log N through three or more sizes gives N_opt(C) and the compute-optimal tokens per parameter
  D_opt / N_opt, per seed and on the seeds' mean. Only a bracketed optimum counts (a size
  inside has the lowest loss and the parabola's minimum lies among the sizes); otherwise the
  budget's lowest size and its D/N are reported as a bound (``edge``), not as an optimum.
- **The fitted law's optimum**: the fit stage's code (``fit.law: auto`` and its families) on
  the runs, and its D_opt / N_opt at the same C: the second estimate.
- **Step noise and size steps**: per (size, budget), the two seeds' relative difference; the
  per-run noise is its sd / sqrt(2). A size step is the relative loss drop from one size to the
  next at the same budget and seed; their median against the noise says whether N shows.

Prints the tables and writes ``isoflop.json``, ``runs.csv`` and ``isoflop.png`` under ``--out``,
and, with two seeds or more, the noise (stages/reporting/health.py ``seed_noise``: run, size
step, budget step and gain-change noise) with every run's point id and where and when they were
trained to ``--noise-out`` (bench/isoflop_noise.json, committed). The report stage shows that noise when the study's grid has one seed and some of
these runs are points of the study (the same ids: the same data, recipe and code): at
``--scale 1`` (the default) the corpus is the study's, so the early-fusion points at the study's
sizes and budgets, seed 0, are the study's own.

    python bench/isoflop.py [--sizes w16d4 xxs xs s] [--tokens 150000 ... 2400000]
                            [--seeds 0 1] [--scale 1] [--analyse]

``--analyse`` re-reads the runs of an earlier call (no training). The defaults train 40 points.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.long_tail import grid, prepare  # noqa: E402
from stages.data.shard_format import text_floors  # noqa: E402
from stages.params import study_params  # noqa: E402
from stages.reporting.health import seed_noise  # noqa: E402
from stages.scaling.fit import fit_table  # noqa: E402
from stages.scaling.runs import load_runs  # noqa: E402

OUT = ROOT / "bench" / "out" / "isoflop"
NOISE_OUT = ROOT / "bench" / "isoflop_noise.json"
SIZES = ["w16d4", "xxs", "xs", "s"]  # widths 16, 32, 48, 64: N 15k .. 208k
TOKENS = [150_000, 300_000, 600_000, 1_200_000, 2_400_000]


def world(scale: float) -> dict:
    """The default corpus ``scale`` times larger (documents per kind)."""
    syn = study_params().corpus.synthetic
    return {k: int(round(getattr(syn, k) * scale)) for k in ("n_caption", "n_interleaved",
                                                            "n_text")}  # fmt: skip


def interpolated(g: pd.DataFrame, D: float) -> float:
    """log L at ``D`` from one size's budgets: linear in log D between the trained budgets;
    NaN outside them (never extrapolated)."""
    x, y = np.log(g["D"].to_numpy(float)), np.log(g["loss"].to_numpy(float))
    order = np.argsort(x)
    x, y = x[order], y[order]
    lx = math.log(D)
    if lx < x[0] - 1e-9 or lx > x[-1] + 1e-9:
        return math.nan
    return float(np.interp(lx, x, y))


def isoflop_optimum(runs: pd.DataFrame, C: float) -> dict:
    """N_opt at compute ``C`` from a parabola in log N through the sizes whose budgets span
    D = C / (6 N); ``edge`` when the parabola's minimum is not inside those sizes (or it opens
    downwards), with the side it lies on."""
    pts = []
    for N, g in runs.groupby("N"):
        y = interpolated(g, C / (6 * N))
        if math.isfinite(y):
            pts.append((math.log(N), y))
    if len(pts) < 3:
        return {"C": C, "sizes": len(pts), "N_opt": None, "ratio": None, "edge": "too few sizes"}
    x, y = np.array(pts).T
    c2, c1, c0 = np.polyfit(x, y, 2)
    best = int(np.argmin(y))
    # bracketed only when a size inside has the lowest loss (the curve turns up on both sides)
    # and the parabola's minimum lies among the sizes
    if not 0 < best < len(x) - 1 or c2 <= 0 or not (x.min() <= -c1 / (2 * c2) <= x.max()):
        side = "at or below" if best == 0 else "at or above" if best == len(x) - 1 else "near"
        bound = C / (6 * math.exp(2 * x[best]))  # D/N of the lowest size on this budget
        return {"C": C, "sizes": len(pts), "N_opt": None, "ratio": None,
                "lowest_N": float(math.exp(x[best])), "ratio_at_lowest": float(bound),
                "edge": f"not bracketed: N_opt {side} N={math.exp(x[best]):.3g} (D/N there "
                        f"{bound:.3g})"}  # fmt: skip
    n_opt = math.exp(-c1 / (2 * c2))
    return {"C": C, "sizes": len(pts), "N_opt": n_opt, "ratio": C / (6 * n_opt**2), "edge": None,
            "L_opt": float(math.exp(c0 - c1**2 / (4 * c2)))}  # fmt: skip


def noise_and_steps(runs: pd.DataFrame) -> dict:
    """Per-run noise (sd of the seeds' log-loss difference / sqrt 2) and the size steps."""
    out: dict = {}
    seeds = sorted(runs.seed.unique())
    if len(seeds) >= 2:
        w = runs.pivot_table(index=["N", "D"], columns="seed", values="loss")
        d = np.log(w[seeds[1]]) - np.log(w[seeds[0]])
        out["noise"] = float(np.std(d, ddof=1) / math.sqrt(2))
        out["noise_pairs"] = int(d.notna().sum())
    steps = []
    for (seed, D), g in runs.groupby(["seed", "D"]):
        g = g.sort_values("N")
        L, N = g["loss"].to_numpy(float), g["N"].to_numpy(float)
        for i in range(len(g) - 1):
            steps.append({"seed": int(seed), "D": float(D), "N_from": N[i], "N_to": N[i + 1],
                          "step": float(1 - L[i + 1] / L[i])})  # fmt: skip
    s = pd.DataFrame(steps)
    out["steps"] = steps
    out["median_step"] = float(s.step.median()) if len(s) else None
    if len(s):
        out["median_step_by_pair"] = {
            f"{a:.3g}->{b:.3g}": float(g.step.median())
            for (a, b), g in s.groupby(["N_from", "N_to"])
        }
    return out


def analyse(runs: pd.DataFrame, shards: Path, out: Path) -> dict:
    runs = runs.assign(loss=runs["loss_avg"].astype(float), D=runs["D"].astype(float),
                       N=runs["N"].astype(float))  # fmt: skip
    lo = (6 * runs.N * runs.D).min()
    hi = (6 * runs.N * runs.D).max()
    budgets = np.geomspace(lo, hi, 13)
    per_seed = {}
    for seed, g in runs.groupby("seed"):
        per_seed[int(seed)] = [isoflop_optimum(g, C) for C in budgets]
    mean = runs.groupby(["N", "D"], as_index=False)["loss"].apply(
        lambda s: float(np.exp(np.log(s).mean()))
    )
    on_mean = [isoflop_optimum(mean, C) for C in budgets]
    # the fit stage's laws on the same runs (avg target): the second estimate of the optimum
    table = load_runs(out / "results" / "runs.parquet")
    floors = text_floors(shards)
    fit = study_params().fit
    fits = fit_table(table[table.target == "avg"], fit, seed=0, floors=floors)
    tf = fits["early/avg"]
    law = tf.law
    n_law, d_law, _ = law.optimum(budgets)
    errs = tf.metrics().get("heldout", {}) if hasattr(tf, "metrics") else {}
    result = {
        "budgets_C": budgets.tolist(),
        "isoflop_per_seed": per_seed,
        "isoflop_on_mean": on_mean,
        "law": {
            "family": tf.choice,
            **{k: float(v) for k, v in law.as_dict().items()},
            "why": tf.why,
            "ratio_at_C": (d_law / n_law).tolist(),
            "heldout": errs,
        },  # fmt: skip
        "grid_ratio_range": [float((runs.D / runs.N).min()), float((runs.D / runs.N).max())],
        **noise_and_steps(runs),
    }
    print_result(result, runs)
    plot(runs, mean, on_mean, out / "isoflop.png")
    return result


def print_result(r: dict, runs: pd.DataFrame) -> None:
    table = runs.pivot_table(index="N", columns="D", values="loss", aggfunc="mean")
    print("validation loss (avg of kinds; mean over seeds), N rows x D columns")
    print(table.round(4).to_string())
    lo, hi = r["grid_ratio_range"]
    print(f"\ngrid D/N: {lo:.3g} .. {hi:.3g}")
    print("\nIsoFLOP optimum D_opt/N_opt per compute (parabola in log N; '-': not bracketed)")
    print(f"{'C':>10} {'mean':>9} " + " ".join(f"{'seed ' + str(s):>9}" for s in
                                                r["isoflop_per_seed"]) + f" {'law':>9}")  # fmt: skip
    for i, C in enumerate(r["budgets_C"]):
        cells = [r["isoflop_on_mean"][i]] + [v[i] for v in r["isoflop_per_seed"].values()]
        txt = " ".join(f"{c['ratio']:9.3g}" if c["ratio"] else f"{'-':>9}" for c in cells)
        print(f"{C:10.3g} {txt} {r['law']['ratio_at_C'][i]:9.3g}")
    print("\nseeds' mean, where not bracketed:")
    for c in r["isoflop_on_mean"]:
        if c["edge"]:
            print(f"  C {c['C']:.3g}: {c['edge']}")
    law = r["law"]
    print(f"\nfitted law ({law['family']}): E {law['E']:.4g} A {law['A']:.4g} B {law['B']:.4g} "
          f"alpha {law['alpha']:.3f} beta {law['beta']:.3f}")  # fmt: skip
    if "noise" in r:
        print(f"per-run noise {r['noise']:.2%} ({r['noise_pairs']} seed pairs); median size step "
              f"{r['median_step']:.2%} ({r['median_step'] / r['noise']:.1f}x the noise)")  # fmt: skip
    for k, v in (r.get("median_step_by_pair") or {}).items():
        print(f"  step N {k}: median {v:.2%}")


def plot(runs: pd.DataFrame, mean: pd.DataFrame, on_mean: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    for N, g in mean.groupby("N"):
        g = g.sort_values("D")
        a.plot(g.D, g.loss, "o-", label=f"N={N:.3g}")
    a.set(xscale="log", yscale="log", xlabel="tokens D", ylabel="loss (avg; mean of seeds)")
    a.legend(fontsize=8)
    for c in on_mean:
        pts = [(N, math.exp(interpolated(g, c["C"] / (6 * N)))) for N, g in mean.groupby("N")]
        pts = [(n, v) for n, v in pts if math.isfinite(v)]
        if len(pts) >= 2:
            x, y = zip(*pts, strict=True)
            b.plot(x, y, ".-", color="grey", lw=0.8)
        if c["N_opt"]:
            b.plot(c["N_opt"], c["L_opt"], "r*")
    b.set(xscale="log", yscale="log", xlabel="parameters N", ylabel="loss at C = 6ND",
          title="IsoFLOP curves (red: parabola minima)")  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def machine() -> str:
    """This machine's CPU model and core count (the noise file says where it was measured)."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores"


def trained_where(out: Path, runs: pd.DataFrame, noise_out: Path, analyse: bool,
                  scale: float) -> dict:  # fmt: skip
    """Where and when these runs were trained, and on which corpus scale: this machine and today
    when this call trained them (kept in ``out``/trained.json for a later ``--analyse``); under
    ``--analyse``, that file, else the noise file already written for exactly these runs, else
    unknown (None): a re-analysis never stamps old runs with this machine or date."""
    path = out / "trained.json"
    if not analyse:
        rec = {"machine": machine(), "measured": time.strftime("%Y-%m-%d"), "scale": scale}
        path.write_text(json.dumps(rec) + "\n")
        return rec
    if path.exists():
        return json.loads(path.read_text())
    if noise_out.exists():
        prev = json.loads(noise_out.read_text())
        if {r["point_id"] for r in prev.get("runs", [])} == set(runs.point_id):
            return {k: prev.get(k) for k in ("machine", "measured", "scale")}
    return {"machine": None, "measured": None, "scale": None}


def noise_record(runs: pd.DataFrame, where: dict) -> dict:
    """What the report reads (stages/reporting/health.py ``bench_noise``): the noise of these
    runs, their point ids, the sizes, budgets and seeds they span, and where (``where``: see
    :func:`trained_where`) and by which code they were trained."""
    ok = runs[runs.status == "ok"]
    revs = sorted(set(ok.get("git_revision", pd.Series(dtype=str)).dropna().astype(str)))
    cols = ["point_id", "size", "N", "tokens_budget", "seed", "loss_avg"]
    return {
        "bench": "bench/isoflop.py",
        "arch": ", ".join(sorted(set(ok.arch))),
        "sizes": list(ok.sort_values("N")["size"].drop_duplicates()),
        "tokens": sorted(int(t) for t in set(ok.tokens_budget)),
        "seeds": sorted(int(s) for s in set(ok.seed)),
        "scale": where.get("scale"),
        "machine": where.get("machine"),
        "git_revision": ", ".join(revs) or None,
        "measured": where.get("measured"),
        "noise": seed_noise(ok),
        "runs": [
            {k: (v.item() if hasattr(v, "item") else v) for k, v in r.items()}
            for r in ok[cols].to_dict("records")
        ],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", nargs="+", default=SIZES)
    ap.add_argument("--tokens", nargs="+", type=int, default=TOKENS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--scale", type=float, default=1.0,
                    help="corpus size x the default's (1: the study's own world)")  # fmt: skip
    ap.add_argument("--analyse", action="store_true", help="the runs of an earlier call only")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--noise-out", type=Path, default=NOISE_OUT,
                    help="the noise and point ids the report reads (two seeds or more)")  # fmt: skip
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    over = {
        "corpus": {"synthetic": world(args.scale)},
        "grid": {"study": "isoflop", "archs": ["early"], "sizes": args.sizes,
                 "tokens": args.tokens, "seeds": args.seeds},
    }  # fmt: skip
    if args.analyse:  # the runs and shards of an earlier call, as they are
        shards = args.out / "data" / "shards"
        runs = pd.read_parquet(args.out / "results" / "runs.parquet")
    else:
        params_path, shards = prepare(args.out, over)
        runs = grid(args.out, params_path, shards)
    runs.to_csv(args.out / "runs.csv", index=False)
    result = analyse(runs, shards, args.out)
    (args.out / "isoflop.json").write_text(json.dumps(result, indent=1, default=float))
    print(f"\nwrote {args.out / 'isoflop.json'}, {args.out / 'isoflop.png'}")
    where = trained_where(args.out, runs, args.noise_out, args.analyse, args.scale)
    if runs.seed.nunique() >= 2:
        rec = noise_record(runs, where)
        args.noise_out.write_text(json.dumps(rec, indent=1) + "\n")
        n = rec["noise"]
        pct = {k: "-" if n.get(k) is None else f"{n[k]:.2%}"
               for k in ("run_sd", "size_step_sd", "budget_step_sd", "gain_change_sd")}  # fmt: skip
        print(f"wrote {args.noise_out}: run noise {pct['run_sd']}, size-step noise "
              f"{pct['size_step_sd']}, budget-step noise {pct['budget_step_sd']}, gain-change "
              f"noise {pct['gain_change_sd']} ({n['points']} points at {n['seeds_min']} seeds)")  # fmt: skip


if __name__ == "__main__":
    main()
