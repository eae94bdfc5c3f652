"""Prediction intervals: what a fitted law says about a run nobody trained, and how sure it is.

The loss a law predicts at (N, D) comes with an interval at ``fit.ci`` built from three sources:

1. **the parameters**: the law refitted on every bootstrap resample of the runs (drawn with
   replacement; stages/scaling/bootstrap.py);
2. **the runs' scatter about the law**: the fit's residuals on log L, widened by
   sqrt(n / (n - p)) for the p parameters the fit spent on the same runs;
3. **the choice of family**: every family that the choice could not separate from the chosen one
   (stages/scaling/choice.py, ``fit.parsimony``) gives its own interval; the prediction's is their
   union.

One family's interval is the central ``ci`` of {log L_k(N, D) + r_i}, every resample's law plus
every residual: a bootstrap prediction interval (Davison & Hinkley 1997, Sec. 6.3.3), no normal
assumption. It covers a fresh run's loss (a new seed, a size not trained), not only the law's
mean: that is what a researcher planning a run needs.

A fits.json entry keeps what the interval needs under ``prediction`` (:func:`block`): the families,
each with its resamples' parameters and its widened residuals; so ``python -m stages.fit
predict`` and the registered MLflow model (which pickles this module by value) compute intervals
anywhere (N, D) without refitting. Pure numpy; no I/O.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np

from stages.scaling.law import FORMS, Law, SmoothMinLaw, law_from_entry

PARAMS = {"paper": ("E", "A", "B", "alpha", "beta"), "shared": ("E", "A", "B", "alpha"),
          "floor": ("A", "B", "alpha", "beta"), "smooth_min": ("E", "N_c", "D_c", "alpha", "beta")}  # fmt: skip
"""The parameters each family fits (the others are fixed by it: shared's beta = alpha, floor's E
= the corpus's floor): their bootstrap intervals have width, the rest are shown as fixed."""


def widened_residuals(obs: np.ndarray, pred: np.ndarray, n_params: int) -> np.ndarray:
    """log(obs / pred) of the runs a law was fitted on, times sqrt(n / (n - p)): residuals of a
    fit are smaller than a fresh run's deviation by about that factor (p parameters fitted)."""
    r = np.log(np.asarray(obs, float)) - np.log(np.asarray(pred, float))
    r = r[np.isfinite(r)]
    n = len(r)
    return r * math.sqrt(n / (n - n_params)) if n > n_params else np.full(n, np.nan)


def draw_laws(family: str, draws: dict[str, Any], fixed: dict[str, float]) -> list:
    """The laws of a family's bootstrap resamples (``draws``: per parameter, one value per
    resample; ``fixed``: values of parameters the resamples do not carry), finite ones only."""
    form = FORMS[family]
    names = ("E", "N_c", "D_c", "alpha", "beta") if form is SmoothMinLaw else ("E", "A", "B",
                                                                                "alpha", "beta")  # fmt: skip
    k = len(next(iter(draws.values()))) if draws else 0
    laws = []
    for i in range(k):
        values = {n: (draws[n][i] if n in draws else fixed.get(n)) for n in names}
        if family == "shared":
            values["beta"] = values["alpha"]
        law = form.from_values(values, family)
        if law is not None and not law.degenerate:
            laws.append(law)
    return laws


def family_interval(
    laws: list, residuals: np.ndarray, N: Any, D: Any, ci: float
) -> tuple[np.ndarray, np.ndarray]:
    """The central ``ci`` interval of {log L_k(N, D) + r_i} over resample laws k and residuals i,
    at each (N, D); NaN where fewer than two resample laws or residuals are finite."""
    N, D = np.atleast_1d(np.asarray(N, float)), np.atleast_1d(np.asarray(D, float))
    r = np.asarray(residuals, float)
    r = r[np.isfinite(r)]
    nan = np.full(np.broadcast(N, D).shape, np.nan)
    if len(laws) < 2 or len(r) < 2:
        return nan, nan.copy()
    N, D = np.broadcast_arrays(N, D)
    with np.errstate(all="ignore"):
        logL = np.log(np.array([law.loss(N, D) for law in laws]))  # (K, M)
    logL = np.where(np.isfinite(logL), logL, np.nan)
    q = 50 * (1 - ci), 50 * (1 + ci)
    low, high = nan.copy(), nan.copy()
    step = max(1, CHUNK // (len(laws) * len(r)))  # points at a time: memory stays bounded
    for a in range(0, logL.shape[1], step):
        combos = (logL[:, None, a : a + step] + r[None, :, None]).reshape(
            -1, logL[:, a : a + step].shape[1]
        )
        if np.isfinite(combos).any():
            with np.errstate(all="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # a point no law reaches: NaN
                low[a : a + step], high[a : a + step] = np.nanpercentile(combos, q, axis=0)
    return np.exp(low), np.exp(high)


CHUNK = 1 << 22
"""Values (resample laws x residuals x points) one percentile pass holds (32 MiB)."""


def union(intervals: list[tuple[np.ndarray, np.ndarray]], shape: tuple[int, ...]):
    """The union (lowest low, highest high) of intervals; NaN where any of them is NaN (a family
    without an interval there: the union of the others would pass for the whole)."""
    if not intervals:
        return np.full(shape, np.nan), np.full(shape, np.nan)
    low, high = np.full(shape, np.inf), np.full(shape, -np.inf)
    for lo, hi in intervals:
        low, high = np.minimum(low, lo), np.maximum(high, hi)
    return low, high


def block(
    families: dict[str, tuple[Law | SmoothMinLaw, dict[str, np.ndarray], np.ndarray, bool]],
    order: list[str],
    ci: float,
) -> dict[str, Any]:
    """The ``prediction`` entry of fits.json: for each family of ``order`` (the chosen first, then
    those the choice could not separate from it), its fitted parameters, its resamples' values of
    the parameters it fits (``draws``), its widened residuals and whether its resamples stayed in
    one basin; ``one_basin``: any family's did."""
    out: dict[str, Any] = {"level": ci, "families": list(order), "one_basin": False, "laws": {}}
    for name in order:
        law, boot, residuals, one_basin = families[name]
        out["laws"][name] = {
            "params": law.as_dict(),
            "resamples": len(next(iter(boot.values()))),
            "resamples_used": len(draw_laws(name, boot, law.as_dict())),  # finite, exponents > 0
            "draws": {k: [_round(v) for v in boot[k]] for k in PARAMS[name] if k in boot},
            "residuals": [_round(v) for v in residuals],
            "one_basin": one_basin,
        }
        out["one_basin"] = out["one_basin"] or one_basin
    return out


def _round(v: float) -> float | None:
    """6 significant digits (a prediction does not need more; fits.json stays readable)."""
    v = float(v)
    return float(f"{v:.6g}") if math.isfinite(v) else None


def predict(
    entry: dict[str, Any], N: Any, D: Any, ci: float | None = None
) -> dict[str, np.ndarray | list[str] | float]:
    """The loss a fits.json ``entry`` predicts at (N, D) and its prediction interval: ``L`` (the
    chosen law), ``low``, ``high`` (the union of the families' intervals: NaN where one has none),
    ``families`` (those in
    the interval), ``one_basin`` (a family's resamples never left its optimum's basin while a
    rival fits nearly as well: the interval is too narrow by an unknown amount), and per family
    ``<family>_low``/``<family>_high``. ``ci`` defaults to the
    level the fit was made at. Without a ``prediction`` block (a fit without bootstrap) the
    interval is NaN."""
    law = law_from_entry(entry)
    if law is None:
        raise ValueError("the fitted law has a missing or infinite parameter")
    N, D = np.atleast_1d(np.asarray(N, float)), np.atleast_1d(np.asarray(D, float))
    L = np.asarray(law.loss(N, D), float)
    pred = entry.get("prediction") or {}
    ci = float(ci if ci is not None else pred.get("level", 0.95))
    out: dict[str, Any] = {"L": L, "level": ci, "families": list(pred.get("families", [])),
                           "one_basin": bool(pred.get("one_basin", False))}  # fmt: skip
    intervals = []
    for name in out["families"]:
        f = pred["laws"][name]
        draws = {k: np.array([np.nan if v is None else v for v in vs], float)
                 for k, vs in f["draws"].items()}  # fmt: skip
        residuals = np.array([np.nan if v is None else v for v in f["residuals"]], float)
        lo, hi = family_interval(draw_laws(name, draws, f["params"]), residuals, N, D, ci)
        out[f"{name}_low"], out[f"{name}_high"] = lo, hi
        intervals.append((lo, hi))
    out["low"], out["high"] = union(intervals, L.shape)
    return out
