"""The scaling laws as objects, and what is derived from a fitted one.

Two forms: :class:`Law`, L(N, D) = E + A/N^alpha + B/D^beta (Shukor et al. 2025, Eq. 1; the
``paper``, ``shared`` and ``floor`` families of stages/scaling/families.py), and
:class:`SmoothMinLaw`, E + [(N_c/N)^(alpha/beta) + D_c/D]^beta (Kaplan et al. 2020, Eq. 1.5).
Both give the loss, the closed-form compute-optimal allocation and its exponents. Also here: the
paper's iso-FLOP regression of the exponents, the loss-compute frontier, fit errors, the
top-compute hold-out. The fit itself is in stages/scaling/search.py. Pure functions of arrays;
no I/O.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

N_PARAMS = 5  # the most any family has: E, A, B, alpha, beta


# ---------------------------------------------------------------------------- the law


@dataclass(frozen=True)
class Law:
    """L(N, D) = E + A / N^alpha + B / D^beta (paper Eq. 1); ``family``: the one it was fitted
    as (paper, shared: alpha = beta, floor: E given)."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    family: str = "paper"

    @classmethod
    def from_values(cls, values: dict[str, Any], family: str = "paper") -> Law | None:
        vals = [values.get(k) for k in ("E", "A", "B", "alpha", "beta")]
        if any(v is None or not np.isfinite(v) for v in vals):
            return None
        return cls(*map(float, vals), family)

    @property
    def degenerate(self) -> bool:
        """An exponent <= 0: the runs do not pin a term down."""
        return not (self.alpha > 0 and self.beta > 0)

    def loss(self, N: Any, D: Any) -> np.ndarray:
        N, D = np.asarray(N, float), np.asarray(D, float)
        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):  # degenerate laws
            # in logs: A = 0 with alpha < 0 (a switched-off term) is 0, not 0 / 0
            term_n = np.exp(np.log(self.A) - self.alpha * np.log(N))
            term_d = np.exp(np.log(self.B) - self.beta * np.log(D))
            return self.E + term_n + term_d

    @property
    def exponents(self) -> dict[str, float]:
        """Closed form (App. C, Table 9): a = beta/(alpha+beta), b = alpha/(alpha+beta), d = b/a."""
        s = self.alpha + self.beta
        if not (self.alpha > 0 and self.beta > 0):
            return {"a": math.nan, "b": math.nan, "d": math.nan}
        return {"a": self.beta / s, "b": self.alpha / s, "d": self.alpha / self.beta}

    def optimum(self, C: Any, ratio: float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Closed-form (N_opt, D_opt, L_opt) under the budget C = 6 * ratio * N * D.

        Minimising A N^-alpha + B D^-beta on N D = M := C / (6 ratio) gives
        D_opt = G M^(alpha/(alpha+beta)), N_opt = M / D_opt, G = (beta B / (alpha A))^(1/(alpha+beta))
        (Hoffmann et al. Eq. 4). ``ratio`` is C / 6ND held fixed (1 for early fusion). NaN
        where there is no interior optimum (a term vanished: A or B = 0, or an exponent <= 0).
        """
        M = np.asarray(C, float) / (6.0 * ratio)
        if not (self.alpha > 0 and self.beta > 0 and self.A > 0 and self.B > 0):
            nan = np.full_like(M, np.nan)
            return nan, nan, nan
        s = self.alpha + self.beta
        G = (self.beta * self.B / (self.alpha * self.A)) ** (1.0 / s)
        D = G * M ** (self.alpha / s)
        N = M / D
        return N, D, self.loss(N, D)

    def as_dict(self) -> dict[str, float]:
        return {"E": self.E, "A": self.A, "B": self.B, "alpha": self.alpha, "beta": self.beta}


@dataclass(frozen=True)
class SmoothMinLaw:
    """L(N, D) = E + [(N_c/N)^(alpha/beta) + D_c/D]^beta (Kaplan et al. 2020, Eq. 1.5, with a
    floor): the term of the bottleneck that binds dominates."""

    E: float
    N_c: float
    D_c: float
    alpha: float
    beta: float
    family: str = "smooth_min"

    @classmethod
    def from_values(cls, values: dict[str, Any], family: str = "smooth_min") -> SmoothMinLaw | None:
        vals = [values.get(k) for k in ("E", "N_c", "D_c", "alpha", "beta")]
        if any(v is None or not np.isfinite(v) for v in vals):
            return None
        return cls(*map(float, vals))

    @property
    def degenerate(self) -> bool:
        return not (self.alpha > 0 and self.beta > 0)

    def loss(self, N: Any, D: Any) -> np.ndarray:
        N, D = np.asarray(N, float), np.asarray(D, float)
        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
            inner = np.logaddexp(
                self.alpha / self.beta * (np.log(self.N_c) - np.log(N)), np.log(self.D_c / D)
            )
            return self.E + np.exp(self.beta * inner)

    @property
    def exponents(self) -> dict[str, float]:
        """The same closed form as the additive law: N_opt ∝ C^(beta/(alpha+beta))."""
        if self.degenerate:
            return {"a": math.nan, "b": math.nan, "d": math.nan}
        s = self.alpha + self.beta
        return {"a": self.beta / s, "b": self.alpha / s, "d": self.alpha / self.beta}

    def optimum(self, C: Any, ratio: float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Closed-form (N_opt, D_opt, L_opt) under C = 6 ratio N D: minimising
        (N_c/N)^(alpha/beta) + D_c N / M over N (M = C / 6 ratio) gives
        N_opt = ((alpha/beta) N_c^(alpha/beta) M / D_c)^(beta/(alpha+beta))."""
        M = np.asarray(C, float) / (6.0 * ratio)
        if self.degenerate:
            nan = np.full_like(M, np.nan)
            return nan, nan, nan
        r = self.alpha / self.beta
        if not (self.N_c > 0 and self.D_c > 0):  # a scale that underflowed: no optimum
            nan = np.full_like(M, np.nan)
            return nan, nan, nan
        with np.errstate(over="ignore", divide="ignore"):  # in logs: N_c^r overflows for big r
            logN = (math.log(r) + r * math.log(self.N_c) + np.log(M) - math.log(self.D_c)) / (1 + r)
            N = np.exp(logN)
        D = M / N
        return N, D, self.loss(N, D)

    def as_dict(self) -> dict[str, float]:
        return {
            "E": self.E,
            "N_c": self.N_c,
            "D_c": self.D_c,
            "alpha": self.alpha,
            "beta": self.beta,
        }


FORMS = {"paper": Law, "shared": Law, "floor": Law, "smooth_min": SmoothMinLaw}


def law_from_entry(entry: dict[str, Any] | None) -> Law | SmoothMinLaw | None:
    """The law of a fits.json entry (its ``law`` family, the paper's form by default; the
    parameters at the entry's top level), or None when one is missing or not finite."""
    if not entry:
        return None
    family = entry.get("law", "paper")
    return FORMS[family].from_values(entry, family)


def below_floor(E: float | None, floor: float | None) -> bool:
    """Whether an irreducible loss E lies below the corpus's entropy ``floor`` (a law the data
    rules out). The floor family's E is exp(log(floor)), which may round one unit in the last
    place below it: that is not below."""
    if E is None or floor is None or not math.isfinite(E):
        return False
    return floor * (1 - 1e-9) > E


def fitted_law(entry: dict[str, Any] | None) -> Law | SmoothMinLaw | None:
    """The non-degenerate law of a fits.json entry, or None."""
    law = law_from_entry(entry)
    return None if law is None or law.degenerate else law


def law_hash(
    laws: dict[str, Law], ratios: dict[str, float], intervals: dict[str, Any] | None = None
) -> str:
    """A short hash of fitted parameters (and the families each prediction interval spans), to
    version registered models.

    6 significant digits: L-BFGS stops within ~1e-5 (relative) of the minimum, so a refit of the
    same data on another machine should not count as a new fit.
    """
    key: dict[str, Any] = {t: [f"{v:.6g}" for v in (*laws[t].as_dict().values(), ratios[t])]
                           for t in sorted(laws)}  # fmt: skip
    if intervals:
        key["intervals"] = {t: intervals[t] for t in sorted(intervals)}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


# ------------------------------------------------------------------- derived quantities


def regression_exponents(
    law: Law, C_min: float, C_max: float, ratio: float, D_range: tuple[float, float], fit: Any
) -> dict[str, float]:
    """The paper's iso-FLOP regression (Sec. 3.1, App. C, Table 9).

    For each C on a log grid over [C_min, C_max], sweep D on a log grid (the data's D range
    widened 1000x each way), set N = C / (6 ratio D), take the argmin of the fitted L (refined by
    a parabola through the three grid points around it), then regress log N_opt and log D_opt on
    log C and log D_opt on log N_opt. A budget whose argmin hits the sweep's edge is dropped.
    ``ratio`` = C / 6ND, held at its median in the data (1 for 6ND; for late fusion
    1 + N_v D_v / N D: the vision/decoder size and token ratios are assumed constant). ``fit``:
    params ``fit`` (its ``sweep``; typed loosely so that the params schema can import this
    module's neighbour, the family registry).
    """
    C = np.geomspace(C_min, C_max, fit.sweep.budgets)
    logD = np.linspace(
        math.log(D_range[0]) - 3 * math.log(10),
        math.log(D_range[1]) + 3 * math.log(10),
        fit.sweep.points,
    )
    D = np.exp(logD)[None, :]
    L = law.loss(C[:, None] / (6 * ratio * D), D)  # (budgets, points)
    i = np.argmin(L, axis=1)
    inside = (i > 0) & (i < len(logD) - 1)
    if inside.sum() < 2:
        return {"a_regression": math.nan, "b_regression": math.nan, "d_regression": math.nan}
    if not inside.all():
        log.warning(
            "iso-FLOP sweep: %d budgets have their optimum outside the swept D", (~inside).sum()
        )
    C, i, L = C[inside], i[inside], L[inside]
    rows = np.arange(len(i))
    fm, f0, fp = L[rows, i - 1], L[rows, i], L[rows, i + 1]
    h = logD[1] - logD[0]
    curv = fm - 2 * f0 + fp
    shift = np.where(curv > 0, 0.5 * h * (fm - fp) / np.where(curv > 0, curv, 1), 0.0)
    D_opt = np.exp(logD[i] + shift)
    N_opt = C / (6 * ratio * D_opt)
    a = np.polyfit(np.log(C), np.log(N_opt), 1)[0]
    b = np.polyfit(np.log(C), np.log(D_opt), 1)[0]
    d = np.polyfit(np.log(N_opt), np.log(D_opt), 1)[0]
    return {"a_regression": float(a), "b_regression": float(b), "d_regression": float(d)}


def lower_hull(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Indices of the lower convex hull of points (x, y), left to right (monotone chain)."""
    order = np.lexsort((y, x))
    hull: list[int] = []
    for k in order:
        while len(hull) >= 2:
            i, j = hull[-2], hull[-1]
            cross = (x[j] - x[i]) * (y[k] - y[i]) - (y[j] - y[i]) * (x[k] - x[i])
            if cross > 0:
                break
            hull.pop()
        if hull and x[hull[-1]] == x[k]:
            continue  # same C, higher loss: not on the lower hull
        hull.append(int(k))
    return np.array(hull, int)


def loss_frontier(C: np.ndarray, L: np.ndarray) -> dict[str, Any]:
    """L ~ c_coef * C^c from the lower convex hull of (log C, log L) (Sec. 3.1, Fig. 2).

    The hull is kept up to its lowest loss (the frontier descends); the exponent is the slope of a
    least-squares line through its vertices. Fewer than two vertices: c is NaN.
    """
    x, y = np.log(C), np.log(L)
    hull = lower_hull(x, y)
    hull = hull[: int(np.argmin(y[hull])) + 1]
    if len(hull) < 2:
        return {"c": math.nan, "c_coef": math.nan, "hull": hull}
    c, c0 = np.polyfit(x[hull], y[hull], 1)
    return {"c": float(c), "c_coef": float(math.exp(c0)), "hull": hull}


def errors(pred: np.ndarray, obs: np.ndarray) -> dict[str, float]:
    """MSE, R^2 and mean relative error of predicted vs observed loss (paper Table 10)."""
    if len(obs) == 0:
        return {"mse": math.nan, "r2": math.nan, "mre": math.nan}
    res = pred - obs
    ss_tot = float(np.sum((obs - obs.mean()) ** 2))
    r2 = 1 - float(np.sum(res**2)) / ss_tot if len(obs) > 1 and ss_tot > 0 else math.nan
    return {"mse": float(np.mean(res**2)), "r2": r2, "mre": float(np.mean(np.abs(res) / obs))}


def holdout_mask(C: np.ndarray, fraction: float) -> np.ndarray:
    """The top ``fraction`` of runs by compute (at least one), held out for extrapolation."""
    k = max(1, int(round(fraction * len(C))))
    mask = np.zeros(len(C), bool)
    mask[np.argsort(C, kind="stable")[-k:]] = True
    return mask


def enough_points(N: np.ndarray, D: np.ndarray) -> str | None:
    """Why these runs cannot determine the five parameters, or None if they can."""
    if len(N) < N_PARAMS:
        return f"{len(N)} runs, fewer than the {N_PARAMS} parameters of the law"
    if len(np.unique(N)) < 2:
        return f"a single model size N={N[0]:g}: alpha and A are not identifiable"
    if len(np.unique(D)) < 2:
        return f"a single token count D={D[0]:g}: beta and B are not identifiable"
    return None


# --------------------------------------------------------------------- compute budgets


@dataclass(frozen=True)
class Budget:
    """What the iso-FLOP sweep needs besides the law: the data's compute and token ranges."""

    C_min: float
    C_max: float
    D_min: float
    D_max: float
    ratio: float  # C / 6ND, median over the runs (1 for C = 6ND)

    @classmethod
    def of(cls, N: np.ndarray, D: np.ndarray, C: np.ndarray) -> Budget:
        ratio = float(np.median(C / (6 * N * D)))
        return cls(float(C.min()), float(C.max()), float(D.min()), float(D.max()), ratio)


def exponents(law: Law, budget: Budget, fit: Any) -> dict[str, float]:
    """a, b, d in closed form and by the iso-FLOP regression (``fit``: params ``fit``)."""
    reg = regression_exponents(
        law, budget.C_min, budget.C_max, budget.ratio, (budget.D_min, budget.D_max), fit
    )
    return {**law.exponents, **reg}
