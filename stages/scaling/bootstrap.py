"""Bootstrap intervals of a fit (paper App. C, Table 11): refits on resamples of the runs,
drawn with replacement, every resample in one batched local search."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pandas as pd

from stages.params import FitParams
from stages.scaling.families import FAMILIES, Points
from stages.scaling.law import Budget, enough_points, exponents, loss_frontier
from stages.scaling.runs import FitError
from stages.scaling.search import SearchResult, refit

# bootstrapped besides the law's parameters (E, A, B, alpha, beta or E, N_c, D_c, alpha, beta)
BOOT_KEYS = ("a", "b", "d", "a_regression", "b_regression", "d_regression", "c",
             "log10_N_opt_mid")  # fmt: skip


def interval(values: np.ndarray, ci: float) -> dict[str, float]:
    """Mean, std and the central ``ci`` percentile interval of bootstrap values (finite ones)."""
    v = values[np.isfinite(values)]
    if len(v) < 2:
        return {"mean": math.nan, "std": math.nan, "low": math.nan, "high": math.nan}
    low, high = np.percentile(v, [50 * (1 - ci), 50 * (1 + ci)])
    with np.errstate(over="ignore", invalid="ignore"):  # A, B of degenerate resamples ~ e^700
        mean, std = float(v.mean()), float(v.std(ddof=1))
    return {
        "mean": mean,
        "std": std,
        "low": float(low),
        "high": float(high),
    }


def _log10_n_opt_mid(law, budget: Budget) -> float:
    """log10 of the compute-optimal N at the geometric middle of the runs' compute range."""
    C = math.sqrt(budget.C_min * budget.C_max)
    with np.errstate(all="ignore"):
        return float(np.log10(law.optimum(np.array([C]), budget.ratio)[0][0]))


def bootstrap(
    runs: pd.DataFrame,
    p: Points,
    search: SearchResult,
    fit: FitParams,
    rng: np.random.Generator,
    desc: str,
) -> dict[str, np.ndarray]:
    """Refit on ``fit.bootstrap`` resamples of the runs, drawn with replacement (App. C, Table 11).

    A resample is a multiplicity per run (a weighted objective: the same as duplicating rows);
    one that cannot identify the law (fewer than 5 distinct runs, a single N or D) is redrawn.
    Each refit starts from the full-data optimum and the ``fit.bootstrap_starts`` best-scored
    grid starts, every resample in one batch. Returns per quantity an array over resamples.
    """
    N, D, C, L = (runs[c].to_numpy(float) for c in ("N", "D", "C", "loss"))
    W = resamples(len(runs), fit.bootstrap, rng, lambda i: enough_points(N[i], D[i]) is None, desc)
    family = FAMILIES[search.family]
    full = Budget.of(N, D, C)  # every resample's N_opt at the same C: the full data's middle
    thetas, _ = refit(family, p, fit, W, search)
    out: dict[str, list[float]] = {k: [] for k in (*search.law.as_dict(), *BOOT_KEYS)}
    for k, theta in enumerate(thetas):
        law = family.law(theta, search.log_floor)
        idx = np.flatnonzero(W[k])
        budget = Budget.of(N[idx], D[idx], C[idx])
        values = {**law.as_dict(), **exponents(law, budget, fit),
                  "c": loss_frontier(C[idx], L[idx])["c"],
                  "log10_N_opt_mid": _log10_n_opt_mid(law, full)}  # fmt: skip
        for key in out:
            out[key].append(values[key])
    return {k: np.array(v, float) for k, v in out.items()}


def resamples(
    n: int, k: int, rng: np.random.Generator, ok: Callable[[np.ndarray], bool], desc: str
) -> np.ndarray:
    """``k`` bootstrap resamples of ``n`` runs as multiplicities (k, n); one whose runs (the
    indices with a nonzero count) are not ``ok`` (cannot identify the law) is redrawn."""
    W = np.zeros((k, n))
    for j in range(k):
        for _try in range(1000):
            counts = rng.multinomial(n, np.full(n, 1.0 / n))
            if ok(np.flatnonzero(counts)):
                break
        else:
            raise FitError(f"{desc}: no bootstrap resample can identify the law")
        W[j] = counts
    return W
