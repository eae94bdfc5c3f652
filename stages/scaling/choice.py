"""Which law family a fit reports: the one that extrapolates as well as the best with the
fewest parameters (``fit.law: auto``), or the one params force.

The families' out-of-sample errors are compared run by run: the top-compute runs predicted by
each family refitted without them, and every run predicted by the family refitted without its
model size (stages/scaling/fit.py computes both).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from stages.params import FitParams
from stages.scaling.families import FAMILIES
from stages.scaling.law import below_floor
from stages.scaling.runs import FitError


def nanmean(x: np.ndarray) -> float:
    x = x[np.isfinite(x)]
    return float(x.mean()) if len(x) else math.nan


def choose(
    families: dict[str, Any], obs: np.ndarray, held: np.ndarray, floor, fit: FitParams
) -> tuple[str, str, list[str]]:
    """The family to report (``fit.law``, or by extrapolation for ``auto``), why, and the
    families the choice could not separate from it (the chosen first; a prediction's interval
    spans them all: stages/scaling/predictive.py).

    ``auto`` compares the families' out-of-sample relative errors, run by run: the top-compute
    runs predicted by each family refitted without them, and every run predicted by the family
    refitted without its model size. The best is the lowest mean error; a family whose errors
    are not worse than the best's by more than ``fit.parsimony`` standard errors of the paired
    difference (the same runs, so the shared noise cancels) extrapolates as well; of those the
    one with the fewest parameters is chosen (the lower error between equals); those it could not
    separate are the others as good as the best (a forced ``fit.law`` has none). Degenerate laws
    (an exponent <= 0) and, when the corpus's ``floor`` is known, laws whose E lies below it
    (an irreducible loss the data's entropy rules out) are chosen only when every family is one.
    """
    err = {n: f.out_of_sample(obs, held) for n, f in families.items()}
    scores = {n: nanmean(e) for n, e in err.items()}
    table = ", ".join(f"{n} {v:.2%}" for n, v in scores.items())
    if fit.law != "auto":
        if fit.law not in families:
            raise FitError(f"fit.law is {fit.law!r} but that family could not be fitted here")
        return fit.law, f"forced by fit.law (out-of-sample error: {table})", [fit.law]
    below = [n for n, f in families.items() if below_floor(f.law.E, floor)]
    ok = [n for n in families
          if not families[n].law.degenerate and n not in below and math.isfinite(scores[n])]  # fmt: skip
    ok = ok or [n for n in families if math.isfinite(scores[n])] or list(families)
    best = min(ok, key=lambda n: scores[n])

    def as_good(n: str) -> bool:
        both = np.isfinite(err[n]) & np.isfinite(err[best])
        d = err[n][both] - err[best][both]
        if n == best or d.size < 2:
            return n == best
        return d.mean() <= fit.parsimony * d.std(ddof=1) / math.sqrt(d.size)

    good = sorted((n for n in ok if as_good(n)), key=lambda n: (FAMILIES[n].n_params, scores[n]))
    choice = good[0]
    why = f"out-of-sample error {scores[choice]:.2%}"
    why += (
        f", the fewest parameters among the families not significantly worse than the best "
        f"({best} {scores[best]:.2%}; {fit.parsimony:g} paired standard errors)"
        if choice != best
        else ", the lowest"
        + (
            " of the families whose E is not below the floor"
            if choice not in below and below
            else ""
        )
    )
    if below:
        E = ", ".join(f"{n} {families[n].law.E:.4g}" for n in below)
        why += f"; E below the floor {floor:.4g} ({E}): " + (
            "not chosen"
            if choice not in below
            else "chosen, as no family above it extrapolates (finite error, exponents > 0)"
        )
    return choice, f"{why}; every family: {table}", good
