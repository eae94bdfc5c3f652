"""The sparsity-aware MoE law, fitted across expert counts (paper Table 12, after Abnar et al.).

Shukor et al. 2025 fit their MoE laws at one sparsity (8 experts, top-1) and report a
sparsity-aware form beside them (App., Table 12) following Abnar et al. 2025 ("Parameters vs
FLOPs: scaling laws for optimal sparsity for Mixture-of-Experts language models"), whose law adds
to the dense terms a sparsity term and a sparsity-parameter interaction:

    L(N, D, S) = E + A/N^alpha + B/D^beta + C (1-S)^lambda + G (1-S)^delta / N^gamma

N the active parameters, D the tokens, S = 1 - top_k/n_experts the fraction of inactive experts.
The exponents lambda and delta take either sign, so this covers Abnar et al.'s c/(1-S)^lambda
and d/((1-S)^delta N^gamma) whichever way they are written (the paper does not print its exact
parametrisation; this is the general one). A, B, C, G > 0; alpha, beta, gamma > 0
and |lambda|, |delta| < 2 (:class:`Sparse` says why).

It is fitted like every family (stages/scaling/families.py): Huber on log residuals, batched
multi-start BFGS (stages/scaling/search.py), in log-sum-exp coordinates (:class:`Sparse`). The
starts: the paper's form fitted to the pooled runs, and its best-scored grid starts, each
combined with 32 settings of the sparsity terms (small or comparable to the rest, either sign of
lambda and delta). Ten parameters from a few expert counts
are not all identifiable (the two N terms trade off), so the report leans on what is: the fit's
errors, its extrapolation to the top-compute runs, to each expert count left out (with three or
more), and the loss change from the fewest to the most experts at the runs' median N and D, with
bootstrap intervals.

Input: a prepared runs table (stages/scaling/runs.py :func:`prepare_runs`) with ``sparsity`` and
``moe_arch`` columns; output: one :class:`SparsityFit` per (MoE arch, target) with two or more
sparsities, :meth:`SparsityFit.metrics` its entry in results/sparsity.json.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from stages.params import FitParams
from stages.scaling.bootstrap import interval, resamples
from stages.scaling.families import FAMILIES, Family, Points, _lse
from stages.scaling.law import enough_points, errors, holdout_mask
from stages.scaling.runs import FitError
from stages.scaling.search import SearchResult, fit_family, refit

log = logging.getLogger(__name__)

COORDS = ("a", "b", "e", "c", "g", "log_alpha", "log_beta", "u", "v", "log_gamma")
N_PARAMS = len(COORDS)


@dataclass(frozen=True)
class SparsityLaw:
    """L(N, D, S) = E + A/N^alpha + B/D^beta + C (1-S)^lambda + G (1-S)^delta / N^gamma."""

    E: float
    A: float
    B: float
    C: float
    G: float
    alpha: float
    beta: float
    lam: float
    delta: float
    gamma: float

    def loss(self, N: Any, D: Any, S: Any) -> np.ndarray:
        N, D, r = np.asarray(N, float), np.asarray(D, float), 1.0 - np.asarray(S, float)
        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
            return (
                self.E
                + self.A * N**-self.alpha
                + self.B * D**-self.beta
                + self.C * r**self.lam
                + self.G * r**self.delta * N**-self.gamma
            )

    def as_dict(self) -> dict[str, float]:
        return {"E": self.E, "A": self.A, "B": self.B, "C": self.C, "G": self.G,
                "alpha": self.alpha, "beta": self.beta, "lambda": self.lam,
                "delta": self.delta, "gamma": self.gamma}  # fmt: skip


class Sparse(Family):
    """The sparsity-aware law as a family of the batched search (``z`` = log(1 - S)).

    Coordinates: log A, log B, log E, log C, log G, then log alpha, log beta, u, v, log gamma
    with lambda = 2 tanh(u), delta = 2 tanh(v). The N, D and interaction exponents are kept
    positive and the sparsity exponents within (-2, 2): with a few expert counts the free form
    fits a step between them (an exponent of -18 on 1 - S, of -24875 on N, on this project's
    first sweep) and predicts nothing; (1 - S)^2 already spans 1 to 1/4096 from 2 to 64 experts.
    """

    name, coords, pair = "sparsity", COORDS, (5, 6)
    description = "E + A/N^alpha + B/D^beta + C (1-S)^lambda + G (1-S)^delta / N^gamma"
    bound = 2.0  # |lambda|, |delta| < bound

    def log_pred(self, theta, x, y, log_floor, z=None):
        if z is None:
            raise ValueError("the sparsity-aware law needs each run's sparsity")
        a, b, e, c, g, la, lb, u, v, lg = (theta[:, i, None] for i in range(N_PARAMS))
        with np.errstate(over="ignore", invalid="ignore"):  # far starts: inf, scored out
            al, be, ga = np.exp(la), np.exp(lb), np.exp(lg)
            tu, tv = np.tanh(u), np.tanh(v)
            lam, de = self.bound * tu, self.bound * tv
            shape = (len(theta), len(x))
            lp, (w1, w2, w3, w4, w5) = _lse(
                a - al * x, b - be * y, np.broadcast_to(e, shape), c + lam * z, g - ga * x + de * z
            )
            J = np.stack([w1, w2, w3, w4, w5, -w1 * x * al, -w2 * y * be,
                          w4 * z * self.bound * (1 - tu**2), w5 * z * self.bound * (1 - tv**2),
                          -w5 * x * ga], axis=-1)  # fmt: skip
        return lp, J

    def shift(self, theta, mu_n, mu_d, sign):
        out = theta.copy()
        out[..., 0] += sign * np.exp(theta[..., 5]) * mu_n  # A / N^alpha
        out[..., 1] += sign * np.exp(theta[..., 6]) * mu_d  # B / D^beta
        out[..., 4] += sign * np.exp(theta[..., 9]) * mu_n  # G / N^gamma
        return out

    def law(self, theta, log_floor=None) -> SparsityLaw:
        a, b, e, c, g, la, lb, u, v, lg = (float(t) for t in theta)
        with np.errstate(over="ignore"):
            E, A, B, C, G, al, be, ga = (float(np.exp(t)) for t in (e, a, b, c, g, la, lb, lg))
        return SparsityLaw(E, A, B, C, G, al, be, self.bound * math.tanh(u),
                           self.bound * math.tanh(v), ga)  # fmt: skip


SPARSE = Sparse()


def start_grid(paper_thetas: np.ndarray) -> np.ndarray:
    """Starts of the sparse law from fits of the paper's form (rows a, b, e, alpha, beta): the
    sparsity term C small or comparable to E, lambda and delta of either sign, the
    interaction G a small or an equal share of the N term, gamma alpha or alpha / 2
    (exponents <= 0.05 of a degenerate fit start at 0.05)."""
    rows = []
    u = math.atanh(0.5 / Sparse.bound)
    for a, b, e, al, be in paper_thetas:
        la, lb = math.log(max(al, 0.05)), math.log(max(be, 0.05))
        for dc, su, (a2, g), sv, lg in itertools.product(
            (-4.0, -2.0), (-u, u), ((a, a - 3.0), (a - 0.7, a - 0.7)), (-u, u),
            (la, la - math.log(2)),
        ):  # fmt: skip
            rows.append((a2, b, e, e + dc, g, la, lb, su, sv, lg))
    return np.array(rows, float)


def enough_sparsity(N: np.ndarray, D: np.ndarray, S: np.ndarray) -> str | None:
    """Why these runs cannot determine the sparse law, or None."""
    if len(np.unique(S)) < 2:
        return "a single sparsity (expert count): the sparsity terms are not identifiable"
    if len(N) < N_PARAMS:
        return f"{len(N)} runs, fewer than the {N_PARAMS} parameters of the law"
    return enough_points(N, D)


@dataclass
class SparsityFit:
    """The sparse law of one (MoE arch, target), its extrapolation checks and bootstrap."""

    arch: str
    target: str
    law: SparsityLaw
    search: SearchResult
    runs: pd.DataFrame  # N, D, S, n_experts, loss, C, pred, pred_holdout, pred_loso, heldout
    boot: dict[str, np.ndarray] = field(default_factory=dict)
    ci: float = 0.95

    @property
    def key(self) -> str:
        return f"{self.arch}/{self.target}"

    def metrics(self) -> dict[str, Any]:
        r = self.runs
        obs, held = r.loss.to_numpy(), r.heldout.to_numpy()
        out: dict[str, Any] = {
            "law": SPARSE.description,
            "n_points": len(r),
            "n_experts": sorted(int(n) for n in r.n_experts.dropna().unique()),
            "sparsities": sorted(float(s) for s in r.S.unique()),
            **self.law.as_dict(),
            **more_experts(self.law, r),
            "objective": self.search.objective,
            "lbfgs_runs": self.search.n_lbfgs,
            "lbfgs_at_best": self.search.n_at_best,
        }
        out.update({f"fit_{k}": v for k, v in errors(r.pred.values, obs).items()})
        p = r.pred_holdout.to_numpy()
        if np.isfinite(p[held]).all():
            out.update({f"heldout_{k}": v for k, v in errors(p[held], obs[held]).items()})
        p = r.pred_loso.to_numpy()
        if np.isfinite(p).any():  # each expert count predicted by the law fitted without it
            ok = np.isfinite(p)
            out.update({f"loso_experts_{k}": v for k, v in errors(p[ok], obs[ok]).items()})
        if self.boot:
            some = next(iter(self.boot.values()))
            out["bootstrap"] = {"resamples": len(some), "level": self.ci,
                                **{k: interval(v, self.ci) for k, v in self.boot.items()}}  # fmt: skip
        return out


def more_experts(law: SparsityLaw, runs: pd.DataFrame) -> dict[str, float]:
    """The law's loss at the runs' median N and D with the fewest and the most experts, and the
    relative change: what going from the one to the other buys at equal active parameters."""
    N, D = float(np.median(runs.N)), float(np.median(runs.D))
    s_lo, s_hi = float(runs.S.min()), float(runs.S.max())
    lo, hi = float(law.loss(N, D, s_lo)), float(law.loss(N, D, s_hi))
    return {"N_mid": N, "D_mid": D, "loss_fewest_experts": lo, "loss_most_experts": hi,
            "more_experts_rel": (hi - lo) / lo}  # fmt: skip


def _search(p: Points, fit: FitParams, W: np.ndarray) -> list[SearchResult]:
    """The paper's form on the pooled runs, then the sparse law from its optima."""
    pooled = Points(p.logN, p.logD, p.logL)
    paper = fit_family(FAMILIES["paper"], pooled, fit, W)
    thetas = np.vstack([np.vstack([s.theta[None, :], s.top_starts]) for s in paper])
    grid = start_grid(np.unique(thetas[np.isfinite(thetas).all(1)], axis=0))
    every = fit.model_copy(update={"starts_per_exponent_pair": None})
    return fit_family(SPARSE, p, every, W, grid=grid)


def fit_sparsity(
    runs: pd.DataFrame, arch: str, target: str, fit: FitParams, seed: int = 0
) -> SparsityFit:
    """Fit the sparse law to one MoE arch's runs (columns N, D, loss, C, sparsity, n_experts):
    the full data, without the top-compute runs, without each expert count (three or more),
    and ``fit.bootstrap`` resamples."""
    key = f"{arch}/{target}"
    r = runs.rename(columns={"sparsity": "S"})[["N", "D", "S", "n_experts", "loss", "C"]]
    r = r.astype(float).reset_index(drop=True)
    N, D, S, L, C = (r[c].to_numpy() for c in ("N", "D", "S", "loss", "C"))
    why = enough_sparsity(N, D, S)
    if why:
        raise FitError(f"{key}: cannot fit the sparsity-aware law: {why}")
    p = Points.of(N, D, L, S)
    held = holdout_mask(C, fit.holdout_fraction)
    rows, names = [np.ones(len(N))], ["full"]
    if enough_sparsity(N[~held], D[~held], S[~held]) is None:
        rows.append((~held).astype(float))
        names.append("holdout")
    levels = np.unique(S)
    if len(levels) >= 3:  # (with three, two are left: C, lambda and E trade off, and the
        # prediction leans on the start grid and the bound on lambda; report it, but sweep 4+)
        for s in levels:
            if enough_sparsity(N[s != S], D[s != S], S[s != S]) is None:
                rows.append((s != S).astype(float))
                names.append(s)
    results = _search(p, fit, np.array(rows))
    search = results[0]
    law = SPARSE.law(search.theta)
    r["pred"] = law.loss(N, D, S)
    r["pred_holdout"] = np.nan
    r["pred_loso"] = np.nan
    for name, res in zip(names[1:], results[1:], strict=True):
        if name == "holdout":
            r["pred_holdout"] = SPARSE.law(res.theta).loss(N, D, S)
        else:
            m = name == S
            r.loc[m, "pred_loso"] = SPARSE.law(res.theta).loss(N[m], D[m], S[m])
    r["heldout"] = held
    boot = bootstrap(r, p, search, fit, seed, key) if fit.bootstrap else {}
    log.info("%s: sparsity-aware law over %d expert counts, %d runs: fit error %.2f%%", key,
             len(levels), len(r), 100 * errors(r.pred.values, L)["mre"])  # fmt: skip
    return SparsityFit(arch, target, law, search, r, boot, fit.ci)


def bootstrap(
    r: pd.DataFrame, p: Points, search: SearchResult, fit: FitParams, seed: int, key: str
) -> dict[str, np.ndarray]:
    """Refits on ``fit.bootstrap`` resamples of the runs (multiplicities; a resample that cannot
    determine the law is redrawn), warm-started like the other families' bootstraps."""
    rng = np.random.default_rng([seed, int(hashlib.sha256(key.encode()).hexdigest()[:8], 16)])
    N, D, S = (r[c].to_numpy() for c in ("N", "D", "S"))
    ok = lambda i: enough_sparsity(N[i], D[i], S[i]) is None  # noqa: E731
    W = resamples(len(r), fit.bootstrap, rng, ok, f"{key} (sparsity-aware law)")
    thetas, _ = refit(SPARSE, p, fit, W, search)
    out: dict[str, list[float]] = {}
    for theta in thetas:
        law = SPARSE.law(theta)
        for k, v in {**law.as_dict(), **more_experts(law, r)}.items():
            if k not in ("N_mid", "D_mid"):
                out.setdefault(k, []).append(v)
    return {k: np.array(v, float) for k, v in out.items()}


def fit_sparsity_table(df: pd.DataFrame, fit: FitParams, seed: int = 0) -> dict[str, SparsityFit]:
    """The sparse law of every (MoE arch, target) of a prepared runs table whose runs have two
    or more sparsities (a grid that sweeps ``grid.experts``); {} when none has."""
    if "sparsity" not in df.columns or "moe_arch" not in df.columns:
        return {}
    moe = df[df.sparsity.notna() & df.moe_arch.notna()]
    out: dict[str, SparsityFit] = {}
    for (arch, target), runs in moe.groupby(["moe_arch", "target"], sort=True):
        if runs.sparsity.nunique() < 2:
            continue
        try:
            f = fit_sparsity(runs, str(arch), str(target), fit, seed)
        except FitError as e:
            if fit.on_bad_target == "error":
                raise
            log.warning("skipped: %s", e)
            continue
        out[f.key] = f
    return out
