"""The scaling law and its fit as the paper does it: the math of stages/fit.py.

Shukor et al. 2025 (arXiv 2504.07951), App. C, following Hoffmann et al. 2022 (App. D.2): with
A = e^a, B = e^b, E = e^e the law L(N, D) = E + A/N^alpha + B/D^beta reads

    log L(N, D) = LSE(a - alpha log N, b - beta log D, e)                          (Eq. 1, App. C)

and the fit minimises the SUM over runs of Huber_delta(log L_hat - log L), delta = 1e-3, with
L-BFGS from a grid of starting points, keeping the best. The objective has local minima, so the
search matters (:func:`fit_law`): every start of the grid is scored in one vectorised evaluation,
then L-BFGS-B (scipy, analytic gradient) runs from the best-scored starts of *each* (alpha, beta)
start pair, or from every start (``fit.starts_per_exponent_pair: null``, the paper's literal
procedure). Also here: the compute-optimal exponents (closed form and the paper's iso-FLOP
regression), the loss-compute frontier, fit errors. Pure functions of arrays; no I/O.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import minimize
from threadpoolctl import threadpool_limits

from stages.params import FitParams

log = logging.getLogger(__name__)

N_PARAMS = 5  # E, A, B, alpha, beta
LBFGS_OPTIONS = {"maxiter": 1000, "ftol": 1e-10, "gtol": 1e-9}


# ---------------------------------------------------------------------------- the law


@dataclass(frozen=True)
class Law:
    """L(N, D) = E + A / N^alpha + B / D^beta (paper Eq. 1)."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float

    @classmethod
    def from_entry(cls, entry: dict[str, Any] | None) -> Law | None:
        """The law of a fits.json entry, or None when a parameter is missing or not finite."""
        vals = [(entry or {}).get(k) for k in ("E", "A", "B", "alpha", "beta")]
        if any(v is None or not np.isfinite(v) for v in vals):
            return None
        return cls(*map(float, vals))

    @property
    def degenerate(self) -> bool:
        """An exponent <= 0: the runs do not pin a term down."""
        return not (self.alpha > 0 and self.beta > 0)

    @classmethod
    def from_theta(cls, theta: np.ndarray) -> Law:
        """From the fit's coordinates (a, b, e, alpha, beta), App. C: A=e^a, B=e^b, E=e^e."""
        a, b, e, alpha, beta = (float(x) for x in theta)
        with np.errstate(over="ignore"):  # a degenerate fit (a term switched off) gives inf
            return cls(*(float(np.exp(x)) for x in (e, a, b)), alpha, beta)

    @property
    def theta(self) -> np.ndarray:
        with np.errstate(divide="ignore"):
            return np.array([*np.log([self.A, self.B, self.E]), self.alpha, self.beta])

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
        (Hoffmann et al. Eq. 4). ``ratio`` is C / 6ND held fixed (1 for early fusion).
        """
        M = np.asarray(C, float) / (6.0 * ratio)
        if not (self.alpha > 0 and self.beta > 0):
            nan = np.full_like(M, np.nan)
            return nan, nan, nan
        s = self.alpha + self.beta
        G = (self.beta * self.B / (self.alpha * self.A)) ** (1.0 / s)
        D = G * M ** (self.alpha / s)
        N = M / D
        return N, D, self.loss(N, D)

    def as_dict(self) -> dict[str, float]:
        return {"E": self.E, "A": self.A, "B": self.B, "alpha": self.alpha, "beta": self.beta}


def fitted_law(entry: dict[str, Any] | None) -> Law | None:
    """The non-degenerate law of a fits.json entry, or None."""
    law = Law.from_entry(entry)
    return None if law is None or law.degenerate else law


def law_hash(laws: dict[str, Law], ratios: dict[str, float]) -> str:
    """A short hash of fitted parameters, to version registered models.

    6 significant digits: L-BFGS stops within ~1e-5 (relative) of the minimum, so a refit of the
    same data on another machine should not count as a new fit.
    """
    key = {t: [f"{v:.6g}" for v in (*laws[t].as_dict().values(), ratios[t])] for t in sorted(laws)}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------ the objective


@dataclass(frozen=True)
class Points:
    """Runs of one (arch, target), in logs; ``w`` are bootstrap multiplicities (None = all 1)."""

    logN: np.ndarray
    logD: np.ndarray
    logL: np.ndarray
    w: np.ndarray | None = None

    @classmethod
    def of(cls, N: Any, D: Any, L: Any, w: np.ndarray | None = None) -> Points:
        return cls(*(np.log(np.asarray(x, float)) for x in (N, D, L)), w)

    def subset(self, idx: np.ndarray, w: np.ndarray | None = None) -> Points:
        return Points(self.logN[idx], self.logD[idx], self.logL[idx], w)


def _log_terms(a, b, e, alpha, beta, p: Points):
    """The LSE of Eq. 1 for one start (scalars) or many ((S, 1) columns): its three stabilised
    exponentials, their sum and the residuals log L_hat - log L (shape (n,) or (S, n))."""
    t1 = a - alpha * p.logN
    t2 = b - beta * p.logD
    m = np.maximum(np.maximum(t1, t2), e)
    x1, x2, x3 = np.exp(t1 - m), np.exp(t2 - m), np.exp(e - m)
    s = x1 + x2 + x3
    return x1, x2, x3, s, m + np.log(s) - p.logL


def _huber(r: np.ndarray, delta: float) -> tuple[np.ndarray, np.ndarray]:
    """Huber_delta(r) and its derivative clip(r, -delta, delta): c (r - c/2) is 0.5 r^2 inside
    [-delta, delta] and delta (|r| - delta/2) outside."""
    c = np.clip(r, -delta, delta)
    return c * (r - 0.5 * c), c


def objective(theta: np.ndarray, p: Points, delta: float) -> tuple[float, np.ndarray]:
    """Sum of Huber_delta(log L_hat - log L) and its analytic gradient in (a, b, e, alpha, beta).

    d log L_hat / d(a, b, e) are the softmax weights x_i / s of the three terms; the exponents
    add -log N, -log D factors.
    """
    x1, x2, x3, s, r = _log_terms(*theta, p)
    h, g = _huber(r, delta)
    g = g / s
    if p.w is not None:
        h, g = h * p.w, g * p.w
    g1, g2 = g * x1, g * x2
    grad = np.array([g1.sum(), g2.sum(), g @ x3, -(g1 @ p.logN), -(g2 @ p.logD)])
    return float(h.sum()), grad


def objective_many(thetas: np.ndarray, p: Points, delta: float, chunk: int = 1 << 20) -> np.ndarray:
    """The objective at many starts (S, 5) at once, in chunks of about ``chunk`` elements."""
    rows = max(1, chunk // max(1, p.logN.size))
    out = np.empty(len(thetas))
    for i in range(0, len(thetas), rows):
        r = _log_terms(*thetas[i : i + rows].T[..., None], p)[-1]  # (rows, n)
        h = _huber(r, delta)[0]
        out[i : i + rows] = (h if p.w is None else h * p.w).sum(1)
    return out


# --------------------------------------------------------------------------- the search


def start_grid(fit: FitParams) -> np.ndarray:
    """Every combination of the start values in ``fit.init``, as rows (a, b, e, alpha, beta)."""
    i = fit.init
    combos = itertools.product(i.a, i.b, i.e, i.alpha, i.beta)
    return np.array(list(combos), float).reshape(-1, N_PARAMS)


def select_starts(grid: np.ndarray, scores: np.ndarray, per_pair: int | None) -> np.ndarray:
    """Indices of the best-scored ``per_pair`` starts of each (alpha, beta) start pair (all if None).

    Keeping starts from every exponent pair, not only the globally best-scored ones, keeps the
    search in every basin the exponents lead to. On synthetic studies (12-140 runs, noise 0-5%,
    random laws), against L-BFGS from all 1764 paper starts: the 32 best-scored starts missed
    the global minimum in 1 of 20, two per pair of the default grid in none of 39.
    """
    if per_pair is None:
        return np.arange(len(grid))
    keep: list[int] = []
    for pair in np.unique(grid[:, 3:], axis=0):
        idx = np.flatnonzero((grid[:, 3:] == pair).all(axis=1))
        keep.extend(idx[np.argsort(scores[idx], kind="stable")[:per_pair]])
    return np.sort(np.array(keep, int))


@dataclass
class SearchResult:
    """The best L-BFGS result of a multi-start search, in the paper's coordinates."""

    theta: np.ndarray
    objective: float
    n_lbfgs: int  # L-BFGS runs
    n_at_best: int  # runs that ended within 1e-4 (relative) of the best objective
    top_starts: np.ndarray  # best-scored grid starts (warm starts for the bootstrap)

    @property
    def law(self) -> Law:
        return Law.from_theta(self.theta)


def _centred(theta_c: np.ndarray, p: Points, delta: float, to_paper: np.ndarray):
    f, g = objective(to_paper @ theta_c, p, delta)
    return f, to_paper.T @ g  # chain rule


def lbfgs(theta0: np.ndarray, p: Points, delta: float) -> tuple[np.ndarray, float]:
    """One L-BFGS-B run (scipy, analytic gradient) from ``theta0``; (theta, objective).

    The same objective, in centred coordinates a_c = a - alpha mean(log N),
    b_c = b - beta mean(log D) (a linear change of variables; starts and results stay in the
    paper's). Uncentred, a and alpha are nearly collinear (log N ~ 20 +- 1.5): on resampled data
    L-BFGS stopped with the objective 1-4% above its minimum and the exponents 0.02-0.05 away;
    centred, 1e-5 and 1e-5.
    """
    to_paper = np.eye(N_PARAMS)
    to_paper[0, 3], to_paper[1, 4] = p.logN.mean(), p.logD.mean()  # a = a_c + alpha mean(log N)
    from_paper = np.linalg.inv(to_paper)
    r = minimize(
        _centred,
        from_paper @ theta0,
        args=(p, delta, to_paper),
        jac=True,
        method="L-BFGS-B",
        options=LBFGS_OPTIONS,
    )
    fun = float(r.fun) if np.isfinite(r.fun) else np.inf
    return to_paper @ r.x, fun


def best_of(starts: np.ndarray, p: Points, delta: float) -> tuple[np.ndarray, float, int]:
    """L-BFGS from each start; (best theta, its objective, how many runs ended within 1e-4 of it).

    BLAS is held to one thread: L-BFGS-B's tiny BLAS calls were 10x slower with OpenBLAS
    threads on a busy 2-core machine (2.8 ms vs 0.27 ms per iteration).
    """
    with threadpool_limits(limits=1, user_api="blas"):
        runs = [lbfgs(s, p, delta) for s in starts]
    funs = np.array([f for _, f in runs])
    i = int(np.argmin(funs))
    at_best = int(np.sum(funs <= funs[i] * (1 + 1e-4) + 1e-12))
    return runs[i][0], float(funs[i]), at_best


def fit_law(p: Points, fit: FitParams, grid: np.ndarray | None = None) -> SearchResult:
    """The paper's multi-start fit (App. C): score every grid start, L-BFGS from the selected."""
    grid = start_grid(fit) if grid is None else grid
    scores = objective_many(grid, p, fit.huber_delta)
    scores = np.where(np.isfinite(scores), scores, np.inf)
    chosen = select_starts(grid, scores, fit.starts_per_exponent_pair)
    theta, fun, at_best = best_of(grid[chosen], p, fit.huber_delta)
    top = grid[np.argsort(scores, kind="stable")[: fit.bootstrap_starts]]
    return SearchResult(theta, fun, len(chosen), at_best, top)


# ------------------------------------------------------------------- derived quantities


def regression_exponents(
    law: Law, C_min: float, C_max: float, ratio: float, D_range: tuple[float, float], fit: FitParams
) -> dict[str, float]:
    """The paper's iso-FLOP regression (Sec. 3.1, App. C, Table 9).

    For each C on a log grid over [C_min, C_max], sweep D on a log grid (the data's D range
    widened 1000x each way), set N = C / (6 ratio D), take the argmin of the fitted L (refined by
    a parabola through the three grid points around it), then regress log N_opt and log D_opt on
    log C and log D_opt on log N_opt. A budget whose argmin hits the sweep's edge is dropped.
    ``ratio`` = C / 6ND, held at its median in the data (1 for 6ND; for late fusion
    1 + N_v D_v / N D: the vision/decoder size and token ratios are assumed constant).
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


def exponents(law: Law, budget: Budget, fit: FitParams) -> dict[str, float]:
    """a, b, d in closed form and by the iso-FLOP regression."""
    reg = regression_exponents(
        law, budget.C_min, budget.C_max, budget.ratio, (budget.D_min, budget.D_max), fit
    )
    return {**law.exponents, **reg}
