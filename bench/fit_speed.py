"""Speed of the scaling-law fit (stages/scaling/): one study per law family, then how it grows.

First the headline: 500 runs (10 sizes x 50 token budgets, paper-like law with 1% noise) fitted
with the default params `fit` section, one law family at a time and then all of them: the
multi-start search, the top-compute hold-out refit, the leave-one-size-out refits and 100
bootstrap resamples (targets: <= 5 s per family, <= 20 s for all, on one core). Then a table
of the paper's multi-start search alone and of 100 bootstrap refits, over the number of runs
and the start grid / selection.

    python bench/fit_speed.py [--points 50 100 250 500 1000] [--paper-all]

``--paper-all`` adds the paper's literal procedure (L-BFGS from all 1764 paper starts), slow.
"""

from __future__ import annotations

import argparse
import logging
import os
import time

import numpy as np
import pandas as pd

from stages.params import FitParams, FitStarts, study_params
from stages.scaling.families import Points
from stages.scaling.fit import fit_target
from stages.scaling.search import fit_law, start_grid

PAPER = FitStarts(
    alpha=[0, 0.5, 2.5],
    beta=[0, 0.5, 2.5],
    a=list(range(0, 31, 5)),
    b=list(range(0, 31, 5)),
    e=[-1, -0.5, 0.5, 1],
)
LAW = dict(E=1.9, A=400.0, B=1200.0, alpha=0.30, beta=0.34)  # paper-like (Table 2, early AVG)


def synthetic_runs(points: int, seed: int = 0, noise: float = 0.01) -> pd.DataFrame:
    """A grid study: ~sqrt(points/5) sizes, the rest token budgets, multiplicative noise."""
    n_N = max(2, int(round(np.sqrt(points / 5))))
    n_D = max(2, points // n_N)
    N, D = (
        x.ravel() for x in np.meshgrid(np.geomspace(2e8, 4e9, n_N), np.geomspace(2e9, 6e11, n_D))
    )
    rng = np.random.default_rng(seed)
    L = LAW["E"] + LAW["A"] / N ** LAW["alpha"] + LAW["B"] / D ** LAW["beta"]
    L = L * np.exp(rng.normal(0, noise, L.size))
    return pd.DataFrame({"N": N, "D": D, "loss": L, "C": 6 * N * D})


def timed(fn, *args, **kw):
    t0 = time.perf_counter()
    out = fn(*args, **kw)
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--points", type=int, nargs="+", default=[50, 100, 250, 500, 1000])
    ap.add_argument("--paper-all", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    print(f"cores: {os.cpu_count()}, load average: {os.getloadavg()[0]:.1f}")

    runs = synthetic_runs(500)
    base = study_params().fit  # the repository's fit settings
    floor = LAW["E"]  # the floor family's known floor: the true E here
    print(f"\n500 runs ({runs.N.nunique()} sizes), default grid, hold-out + leave-one-size-out "
          f"refits + {base.bootstrap} bootstrap resamples:")  # fmt: skip
    for family in [*base.families, "all"]:
        names = base.families if family == "all" else [family]
        fit = base.model_copy(
            update={"families": names, "law": "auto" if family == "all" else family}
        )
        f, seconds = timed(fit_target, runs, "early", "avg", fit, 0, floor)
        ff = f.families[f.choice]
        print(
            f"  {family:>10}: {seconds:5.1f} s  (chosen {f.choice}: alpha={ff.law.alpha:.4f} "
            f"[{np.percentile(ff.boot['alpha'], 2.5):.4f}, {np.percentile(ff.boot['alpha'], 97.5):.4f}]"
            f", true {LAW['alpha']}; {ff.search.n_lbfgs} local searches)"
        )

    configs = [
        (
            "paper grid, 2/pair",
            fit.model_copy(update={"init": PAPER, "starts_per_exponent_pair": 2}),
        ),
        ("default grid, 2/pair", fit),
        ("default grid, 8/pair", fit.model_copy(update={"starts_per_exponent_pair": 8})),
    ]
    if args.paper_all:
        configs.append(
            (
                "paper grid, all",
                fit.model_copy(update={"init": PAPER, "starts_per_exponent_pair": None}),
            )
        )
    print(
        f"\n{'runs':>5} {'starts':>22} {'grid':>6} {'L-BFGS':>6} {'search s':>9} {'100 boot s':>10}"
    )
    for points in args.points:
        runs = synthetic_runs(points)
        p = Points.of(runs.N, runs.D, runs.loss)
        for name, cfg in configs:
            grid = start_grid(cfg)
            search, s_search = timed(fit_law, p, cfg, grid)
            boot_s = boot_seconds(runs, cfg, search)
            print(
                f"{len(runs):>5} {name:>22} {len(grid):>6} {search.n_lbfgs:>6} {s_search:>9.2f} {boot_s:>10.2f}"
            )


def boot_seconds(runs: pd.DataFrame, fit: FitParams, search) -> float:
    """Seconds for 100 bootstrap refits (warm start + fit.bootstrap_starts grid starts)."""
    from stages.scaling.bootstrap import bootstrap

    r = runs.assign(C=6 * runs.N * runs.D)
    p = Points.of(r.N, r.D, r.loss)
    rng = np.random.default_rng(0)
    _, seconds = timed(
        bootstrap, r, p, search, fit.model_copy(update={"bootstrap": 100}), rng, "bench"
    )
    return seconds


if __name__ == "__main__":
    main()
