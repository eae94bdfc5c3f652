"""The law families a fit can choose from, each as log L(N, D; theta) with its Jacobian.

Every family is fitted the paper's way (App. C): Huber on the residuals of log L, multi-start
local search (stages/scaling/search.py). In the log-sum-exp coordinates of App. C (A = e^a,
B = e^b, E = e^e):

- ``paper``: E + A/N^alpha + B/D^beta, theta = (a, b, e, alpha, beta) (Shukor et al. Eq. 1,
  Hoffmann et al. 2022);
- ``shared``: one exponent for both terms, alpha = beta = gamma, theta = (a, b, e, gamma)
  (the simpler law several data-constrained studies fit, e.g. Muennighoff et al. 2023, and the
  form that extrapolated best on a published ladder of language-model runs);
- ``floor``: the paper's form with E fixed at a known floor (the corpus's exact entropy),
  theta = (a, b, alpha, beta): E is not identifiable from small models (it fell below the floor
  in the default study) and fixing it removes the worst-determined parameter;
- ``smooth_min``: Kaplan et al. 2020 Eq. 1.5 with a floor, E + [(N_c/N)^(alpha/beta) + D_c/D]^beta,
  theta = (n, d, e, alpha, beta) with N_c = e^n, D_c = e^d: the bottleneck that binds dominates
  (a memoriser that needs capacity AND data has this shape; bench/long_tail.py oracle).

Each family evaluates ``log_pred(theta, x, y)`` for a batch of parameter vectors (B, P) at
centred log N, log D (x = log N - mean, y = log D - mean; centring removes the near-collinearity
of a and alpha) and returns log L (B, n) and d log L / d theta (B, n, P).

:data:`FAMILIES` is the one registry of the family names: the params schema takes the allowed
``fit.law`` and ``fit.families`` from it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np

from stages.scaling.law import Law, SmoothMinLaw


@dataclass(frozen=True)
class Points:
    """Runs of one (arch, target), in logs; ``logR``: log(1 - S) of MoE runs of several
    sparsities S (the sparsity-aware law of stages/scaling/sparsity.py), else None."""

    logN: np.ndarray
    logD: np.ndarray
    logL: np.ndarray
    logR: np.ndarray | None = None

    @classmethod
    def of(cls, N: Any, D: Any, L: Any, S: Any = None) -> Points:
        logR = None if S is None else np.log1p(-np.asarray(S, float))
        return cls(*(np.log(np.asarray(x, float)) for x in (N, D, L)), logR)

    def subset(self, idx: np.ndarray) -> Points:
        logR = None if self.logR is None else self.logR[idx]
        return Points(self.logN[idx], self.logD[idx], self.logL[idx], logR)

    @property
    def centre(self) -> tuple[float, float]:
        return float(self.logN.mean()), float(self.logD.mean())


def _lse(*terms: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """log sum exp of same-shaped terms, and each term's softmax weight."""
    m = terms[0]
    for t in terms[1:]:
        m = np.maximum(m, t)
    ex = [np.exp(t - m) for t in terms]
    s = ex[0]
    for e in ex[1:]:
        s = s + e
    return m + np.log(s), [e / s for e in ex]


def _columns(*cols: np.ndarray) -> np.ndarray:
    """np.stack(cols, axis=-1) of same-shaped (B, n) arrays, without its per-call overhead."""
    out = np.empty((*cols[0].shape, len(cols)))
    for i, c in enumerate(cols):
        out[..., i] = c
    return out


# fit.init's list that seeds each coordinate (smooth_min's log N_c, log D_c take a's and b's)
INIT = {"a": "a", "b": "b", "e": "e", "alpha": "alpha", "beta": "beta", "gamma": "alpha",
        "n": "a", "d": "b"}  # fmt: skip


class Family:
    """One law family (see the module docstring); subclasses define the form."""

    name: str = ""
    coords: tuple[str, ...] = ()
    needs_floor = False
    description = ""
    pair: tuple[int, ...] = ()  # coordinates of the exponents (alpha, beta; shared: one)

    @property
    def n_params(self) -> int:
        return len(self.coords)

    def log_pred(
        self, theta: np.ndarray, x: np.ndarray, y: np.ndarray, log_floor: float | None
    ) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def grid(self, fit: Any) -> np.ndarray:
        """The start grid, every combination of ``fit.init``'s values (uncentred theta;
        ``fit``: params ``fit``, which imports this registry: so not typed here)."""
        values = (getattr(fit.init, INIT[c]) for c in self.coords)
        return np.array(list(itertools.product(*values)), float)

    def shift(self, theta: np.ndarray, mu_n: float, mu_d: float, sign: float) -> np.ndarray:
        """theta for centred data (sign -1) or back (sign +1); the data centre is (mu_n, mu_d).
        Additive forms: log A and log B move by their exponent (coordinates ``pair``) times
        the centre."""
        out = theta.copy()
        out[..., 0] += sign * theta[..., self.pair[0]] * mu_n
        out[..., 1] += sign * theta[..., self.pair[-1]] * mu_d
        return out

    def law(self, theta: np.ndarray, log_floor: float | None) -> Law | SmoothMinLaw:
        raise NotImplementedError


class Paper(Family):
    name, coords, pair = "paper", ("a", "b", "e", "alpha", "beta"), (3, 4)
    description = "E + A/N^alpha + B/D^beta (the paper's form)"

    def log_pred(self, theta, x, y, log_floor):
        a, b, e, al, be = (theta[:, i, None] for i in range(5))
        lp, (w1, w2, w3) = _lse(a - al * x, b - be * y, e)
        J = _columns(w1, w2, w3, -w1 * x, -w2 * y)
        return lp, J

    def law(self, theta, log_floor):
        a, b, e, al, be = (float(v) for v in theta)
        with np.errstate(over="ignore"):  # a degenerate fit (a term switched off) gives inf
            return Law(float(np.exp(e)), float(np.exp(a)), float(np.exp(b)), al, be, self.name)


class Shared(Family):
    name, coords, pair = "shared", ("a", "b", "e", "gamma"), (3,)
    description = "E + A/N^gamma + B/D^gamma (one exponent)"

    def log_pred(self, theta, x, y, log_floor):
        a, b, e, g = (theta[:, i, None] for i in range(4))
        lp, (w1, w2, w3) = _lse(a - g * x, b - g * y, e)
        return lp, _columns(w1, w2, w3, -w1 * x - w2 * y)

    def law(self, theta, log_floor):
        a, b, e, g = (float(v) for v in theta)
        with np.errstate(over="ignore"):
            return Law(float(np.exp(e)), float(np.exp(a)), float(np.exp(b)), g, g, self.name)


class Floor(Family):
    name, coords, pair = "floor", ("a", "b", "alpha", "beta"), (2, 3)
    needs_floor = True
    description = "floor + A/N^alpha + B/D^beta (E fixed at the corpus's floor)"

    def log_pred(self, theta, x, y, log_floor):
        a, b, al, be = (theta[:, i, None] for i in range(4))
        e = np.full((len(theta), len(x)), log_floor)
        lp, (w1, w2, _) = _lse(a - al * x, b - be * y, e)
        return lp, _columns(w1, w2, -w1 * x, -w2 * y)

    def law(self, theta, log_floor):
        a, b, al, be = (float(v) for v in theta)
        with np.errstate(over="ignore"):
            E = float(np.exp(log_floor))
            return Law(E, float(np.exp(a)), float(np.exp(b)), al, be, self.name)


class SmoothMin(Family):
    name, coords, pair = "smooth_min", ("n", "d", "e", "alpha", "beta"), (3, 4)
    description = "E + [(N_c/N)^(alpha/beta) + D_c/D]^beta (Kaplan et al. 2020 Eq. 1.5)"

    def log_pred(self, theta, x, y, log_floor):
        n, d, e, al, be = (theta[:, i, None] for i in range(5))
        ok = be > 1e-6
        safe = np.where(ok, be, 1.0)
        r = al / safe
        inner, (v1, v2) = _lse(r * (n - x), d - y)
        lp, (wr, we) = _lse(safe * inner, e)
        J = _columns(
            wr * al * v1, wr * safe * v2, we, wr * v1 * (n - x), wr * (inner - r * v1 * (n - x))
        )
        lp = np.where(ok, lp, np.inf)  # beta <= 0: not a law of this family
        return lp, J

    def shift(self, theta, mu_n, mu_d, sign):  # N_c, D_c scale with the data, not by an exponent
        out = theta.copy()
        out[..., 0] += sign * mu_n
        out[..., 1] += sign * mu_d
        return out

    def law(self, theta, log_floor):
        n, d, e, al, be = (float(v) for v in theta)
        with np.errstate(over="ignore"):
            return SmoothMinLaw(float(np.exp(e)), float(np.exp(n)), float(np.exp(d)), al, be)


FAMILIES: dict[str, Family] = {f.name: f for f in (Paper(), Shared(), Floor(), SmoothMin())}
