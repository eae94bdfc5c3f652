"""Bootstrap intervals of a fit (paper App. C, Table 11): refits on resamples of the runs,
drawn with replacement, every resample in one batched local search."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd

from stages.params import FitParams
from stages.scaling.families import FAMILIES, Points
from stages.scaling.law import Budget, enough_points, exponents, loss_frontier
from stages.scaling.runs import FitError
from stages.scaling.search import SearchResult, multistart_problems, refit

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
    (A fit that has other refits from the same starts draws with :func:`bootstrap_resamples`,
    refits them in the same batch and summarises with :func:`bootstrap_values`.)
    """
    W = bootstrap_resamples(runs, fit, rng, desc)
    thetas, _ = refit(FAMILIES[search.family], p, fit, W, search)
    return bootstrap_values(runs, search, fit, W, thetas)


def bootstrap_resamples(
    runs: pd.DataFrame, fit: FitParams, rng: np.random.Generator, desc: str
) -> np.ndarray:
    """The bootstrap's ``fit.bootstrap`` resamples of the runs (k, n), each able to identify
    the law (:func:`resamples`)."""
    N, D = runs.N.to_numpy(float), runs.D.to_numpy(float)
    return resamples(len(runs), fit.bootstrap, rng, lambda i: enough_points(N[i], D[i]) is None,
                     desc)  # fmt: skip


def bootstrap_values(
    runs: pd.DataFrame, search: SearchResult, fit: FitParams, W: np.ndarray, thetas: np.ndarray
) -> dict[str, np.ndarray]:
    """Per quantity (the law's parameters and :data:`BOOT_KEYS`), its value at each resample
    ``W[k]``'s refit ``thetas[k]``: an array over resamples."""
    N, D, C, L = (runs[c].to_numpy(float) for c in ("N", "D", "C", "loss"))
    family = FAMILIES[search.family]
    full = Budget.of(N, D, C)  # every resample's N_opt at the same C: the full data's middle
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


RIVAL_OBJECTIVE = 0.05
"""A rival optimum fits the runs within 5% of the best objective of the full fit ..."""
RIVAL_DISTANCE = 0.1
"""... with an exponent at least 0.1 away from the best's (and from every other rival's)."""


def basins(search: SearchResult, boot: dict[str, np.ndarray]) -> dict[str, Any]:
    """Whether the bootstrap's resamples ever left the basin of the full fit's optimum.

    Rivals are where other local searches of the full fit ended nearly as well
    (:data:`RIVAL_OBJECTIVE`) with different exponents (:data:`RIVAL_DISTANCE`): a valley or a
    second minimum the runs do not rule out. Each resample's refit is assigned to the nearest of
    the optimum and the rivals by its exponents. ``one_basin``: rivals exist and no resample
    reached one, so the intervals describe one basin only and look more certain than the runs
    are (flagged where they are shown)."""
    pair = list(FAMILIES[search.family].pair)
    best = search.theta[pair]
    rivals: list[dict[str, float]] = []
    kept = [best]
    if search.ends is not None and len(search.ends):
        f = search.end_objectives
        near = np.isfinite(f) & (f <= search.objective * (1 + RIVAL_OBJECTIVE) + 1e-12)
        for i in np.flatnonzero(near)[np.argsort(f[near], kind="stable")]:
            e = search.ends[i, pair]
            if all(np.abs(e - k).max() > RIVAL_DISTANCE for k in kept):
                kept.append(e)
                rel = float(f[i] / search.objective - 1) if search.objective > 0 else 0.0
                rivals.append({"alpha": float(e[0]), "beta": float(e[-1]), "objective_rel": rel})
    names = ("alpha", "beta")[: len(pair)]
    if not boot or any(n not in boot for n in names):
        return {"rivals": rivals, "resamples_elsewhere": 0, "one_basin": False}
    ex = np.column_stack([boot[n] for n in names])
    ok = np.isfinite(ex).all(1)
    dist = np.stack([np.abs(ex[ok] - k).max(1) for k in kept], axis=1)  # (K, 1 + rivals)
    elsewhere = int((dist.argmin(1) > 0).sum()) if dist.size else 0
    return {"rivals": rivals, "resamples_elsewhere": elsewhere,
            "one_basin": bool(rivals) and elsewhere == 0}  # fmt: skip


def refit_bootstraps(
    runs: pd.DataFrame,
    p: Points,
    warm: SearchResult,
    fit: FitParams,
    refits: list[tuple[np.ndarray, np.ndarray]],
    rng: np.random.Generator,
    desc: str,
) -> list[np.ndarray]:
    """The bootstrap of refits on subsets of the runs (the extrapolation checks' refits), so that
    their predictions carry the same interval as the full fit's: for each (mask, theta) of
    ``refits`` (the runs it was fitted on; its optimum), ``fit.bootstrap`` resamples of those runs,
    each refitted from theta, all in one batch. Returns per refit the resamples' thetas (k, P); a
    subset that no resample can identify gives NaN.

    Only from theta, unlike :func:`bootstrap`, which adds the full fit's best grid starts: 5x
    cheaper, and on the default study's 20 fits the coverage it measures differed from the one
    with the four grid starts added in one run of 380 (a top-compute run of one fit)."""
    N, D = runs.N.to_numpy(float), runs.D.to_numpy(float)
    n, k = len(runs), fit.bootstrap
    W, starts, where = [], [], []
    for j, (mask, theta) in enumerate(refits):
        idx = np.flatnonzero(mask)
        try:
            Ns, Ds = N[idx], D[idx]
            sub = resamples(len(idx), k, rng, lambda i, Ns=Ns, Ds=Ds: enough_points(Ns[i], Ds[i])
                            is None, f"{desc} refit {j}")  # fmt: skip
        except FitError:
            continue
        full = np.zeros((k, n))
        full[:, idx] = sub
        W.append(full)
        starts += [theta[None, :]] * k
        where.append(j)
    P = len(warm.theta)
    out = [np.full((k, P), np.nan) for _ in refits]
    if W:
        thetas, _ = multistart_problems(FAMILIES[warm.family], p, fit, np.vstack(W), starts,
                                        warm.log_floor)  # fmt: skip
        for i, j in enumerate(where):
            out[j] = thetas[i * k : (i + 1) * k]
    return out


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
