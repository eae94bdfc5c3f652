"""The fit of one scaling law per (arch, target) of a runs table: fits, exponents, intervals.

Shukor et al. 2025 (arXiv 2504.07951), App. C: the multi-start Huber/L-BFGS fit of
stages/scaling/law.py, per (arch, target) of a table of runs. From each fitted law come the
compute-optimal exponents N_opt ~ C^a, D_opt ~ C^b, D_opt ~ N_opt^d in closed form and by the
paper's iso-FLOP regression (Sec. 3.1, Table 9), the loss-compute frontier L ~ C^c (convex
hull, Sec. 3.1), bootstrap intervals (App. C, Table 11) and an extrapolation check on the
highest-compute runs (Table 10). Compute is C = 6ND, or 6(N_v D_v + N D) for late fusion when
the table has N_v, D_v (Sec. 3.1).

Input: any table of runs with columns N, D, loss and optionally arch, target, C, N_v, D_v
(:func:`prepare_runs`); output: a :class:`TargetFit` per (arch, target), whose
:meth:`TargetFit.metrics` is its fits.json entry (:func:`write_metrics`). The stage entry point
is stages/fit.py; figures are in stages/scaling/plots.py, MLflow records in
stages/scaling/tracking.py.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from stages.params import FitParams
from stages.scaling.families import FAMILIES, Points
from stages.scaling.law import (
    Budget,
    Law,
    SmoothMinLaw,
    below_floor,
    enough_points,
    errors,
    exponents,
    holdout_mask,
    loss_frontier,
)
from stages.scaling.search import SearchResult, fit_family, refit

log = logging.getLogger(__name__)

REQUIRED = ("N", "D", "loss")
DEFAULT_ARCH = DEFAULT_TARGET = "all"
# bootstrapped besides the law's parameters (E, A, B, alpha, beta or E, N_c, D_c, alpha, beta)
BOOT_KEYS = ("a", "b", "d", "a_regression", "b_regression", "d_regression", "c",
             "log10_N_opt_mid")  # fmt: skip


class FitError(ValueError):
    """The runs table cannot be fitted; the message names the arch/target or the columns."""


@dataclass
class FamilyFit:
    """One law family fitted to one (arch, target): the law, its exponents, how well it
    extrapolates (refitted without the top-compute runs; without each model size in turn), and
    its bootstrap."""

    family: str
    law: Law | SmoothMinLaw
    search: SearchResult
    exponents: dict[str, float]
    pred: np.ndarray  # the law's loss at every run
    pred_holdout: np.ndarray  # the law refitted without the held-out runs (NaN: no refit)
    pred_loso: np.ndarray  # each run predicted by the law refitted without its model size
    holdout_law: Law | SmoothMinLaw | None
    boot: dict[str, np.ndarray] = field(default_factory=dict)

    def out_of_sample(self, obs: np.ndarray, held: np.ndarray) -> np.ndarray:
        """Relative errors of the hold-out refit on the held-out runs, then of the
        leave-one-size-out refits on every run (NaN where a refit was not possible)."""
        e_held = np.abs(self.pred_holdout[held] - obs[held]) / obs[held]
        return np.concatenate([e_held, np.abs(self.pred_loso - obs) / obs])

    def errors(self, obs: np.ndarray, held: np.ndarray, floor: float | None) -> dict[str, float]:
        """Relative errors on L, and on the reducible loss L - E (E: the floor if known, else
        this law's), of the fit, the top-compute hold-out and the leave-one-size-out refits."""
        E = floor if floor is not None else self.law.E
        red = np.where(obs - E > 0, obs - E, np.nan)
        out = {"fit_mre": _mre(self.pred, obs)}
        for name, pred, mask in (("heldout", self.pred_holdout, held),
                                 ("loso", self.pred_loso, np.ones_like(held))):  # fmt: skip
            out[f"{name}_mre"] = _mre(pred[mask], obs[mask])
            with np.errstate(invalid="ignore"):
                out[f"{name}_mre_reducible"] = _nanmean(np.abs(pred - obs)[mask] / red[mask])
        out["out_of_sample_mre"] = _nanmean(self.out_of_sample(obs, held))
        return out


def _nanmean(x: np.ndarray) -> float:
    x = x[np.isfinite(x)]
    return float(x.mean()) if len(x) else math.nan


def _mre(pred: np.ndarray, obs: np.ndarray) -> float:
    return _nanmean(np.abs(pred - obs) / obs)


@dataclass
class TargetFit:
    """Everything fitted for one (arch, target); :meth:`metrics` is its fits.json entry.

    ``law``, ``search``, ``exponents``, ``holdout_law``, ``boot`` and the ``pred*`` columns of
    ``runs`` are the chosen family's (``choice``); every family's fit is in ``families``."""

    arch: str
    target: str
    runs: pd.DataFrame  # N, D, loss, C, pred, pred_holdout, pred_loso, heldout, on_frontier
    budget: Budget
    frontier: dict[str, Any]
    families: dict[str, FamilyFit]
    choice: str
    why: str
    floor: float | None = None
    ci: float = 0.95
    mixture: dict[str, Any] | None = None  # base_arch, name and shares when a grid has several

    @property
    def chosen(self) -> FamilyFit:
        return self.families[self.choice]

    @property
    def law(self) -> Law | SmoothMinLaw:
        return self.chosen.law

    @property
    def search(self) -> SearchResult:
        return self.chosen.search

    @property
    def exponents(self) -> dict[str, float]:
        return self.chosen.exponents

    @property
    def holdout_law(self) -> Law | SmoothMinLaw | None:
        return self.chosen.holdout_law

    @property
    def boot(self) -> dict[str, np.ndarray]:
        return self.chosen.boot

    @property
    def key(self) -> str:
        return f"{self.arch}/{self.target}"

    def _bootstrap(self, boot: dict[str, np.ndarray]) -> dict[str, Any]:
        some = next(iter(boot.values()))
        return {"resamples": len(some), "level": self.ci,
                **{k: interval(v, self.ci) for k, v in boot.items()}}  # fmt: skip

    def metrics(self) -> dict[str, Any]:
        r = self.runs
        obs, held = r.loss.to_numpy(), r.heldout.to_numpy()
        out: dict[str, Any] = {
            "law": self.choice,
            "law_why": self.why,
            "floor": self.floor,
            **({"mixture": self.mixture} if self.mixture else {}),
            "n_points": len(r),
            "n_N": int(r.N.nunique()),
            "n_D": int(r.D.nunique()),
            "C_min": self.budget.C_min,
            "C_max": self.budget.C_max,
            "compute_ratio": self.budget.ratio,
            **self.law.as_dict(),
            **self.exponents,
            "c": self.frontier["c"],
            "c_coef": self.frontier["c_coef"],
            "objective": self.search.objective,
            "lbfgs_runs": self.search.n_lbfgs,
            "lbfgs_at_best": self.search.n_at_best,
        }
        out.update({f"fit_{k}": v for k, v in errors(r.pred.values, obs).items()})
        out["heldout_points"] = int(held.sum())
        if self.holdout_law is not None:
            p = r.pred_holdout.values
            out.update({f"heldin_{k}": v for k, v in errors(p[~held], obs[~held]).items()})
            out.update({f"heldout_{k}": v for k, v in errors(p[held], obs[held]).items()})
        out.update({f"loso_{k}": v for k, v in errors(r.pred_loso.values, obs).items()})
        chosen = self.chosen.errors(obs, held, self.floor)  # and on the reducible loss L - E
        out.update({k: v for k, v in chosen.items() if k.endswith("_reducible")})
        if self.boot:
            out["bootstrap"] = self._bootstrap(self.boot)
        out["families"] = {
            name: {
                **f.law.as_dict(),
                "n_params": FAMILIES[name].n_params,
                "degenerate": f.law.degenerate,
                **f.exponents,
                **f.errors(obs, held, self.floor),
                **({"bootstrap": self._bootstrap(f.boot)} if f.boot else {}),
            }
            for name, f in self.families.items()
        }
        return out


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


def check_runs(runs: pd.DataFrame, key: str) -> None:
    """Raise :class:`FitError` naming ``key`` (arch/target) if these runs cannot be fitted."""
    for col in ("N", "D", "loss", "C"):
        v = runs[col].to_numpy(float)
        bad = ~(np.isfinite(v) & (v > 0))
        if bad.any():
            rows = ", ".join(str(i) for i in runs.index[bad][:5])
            raise FitError(
                f"{key}: {bad.sum()} run(s) with a NaN, infinite or non-positive {col} "
                f"(table rows {rows}); a scaling law needs positive N, D, C and loss"
            )
    why = enough_points(runs.N.to_numpy(float), runs.D.to_numpy(float))
    if why:
        raise FitError(f"{key}: cannot fit the law: {why}")


def choose(
    families: dict[str, FamilyFit], obs: np.ndarray, held: np.ndarray, floor, fit: FitParams
) -> tuple[str, str]:
    """The family to report (``fit.law``, or by extrapolation for ``auto``) and why.

    ``auto`` compares the families' out-of-sample relative errors, run by run: the top-compute
    runs predicted by each family refitted without them, and every run predicted by the family
    refitted without its model size. The best is the lowest mean error; a family whose errors
    are not worse than the best's by more than ``fit.parsimony`` standard errors of the paired
    difference (the same runs, so the shared noise cancels) extrapolates as well; of those the
    one with the fewest parameters is chosen (the lower error between equals). Degenerate laws
    (an exponent <= 0) and, when the corpus's ``floor`` is known, laws whose E lies below it
    (an irreducible loss the data's entropy rules out) are chosen only when every family is one.
    """
    err = {n: f.out_of_sample(obs, held) for n, f in families.items()}
    scores = {n: _nanmean(e) for n, e in err.items()}
    table = ", ".join(f"{n} {v:.2%}" for n, v in scores.items())
    if fit.law != "auto":
        if fit.law not in families:
            raise FitError(f"fit.law is {fit.law!r} but that family could not be fitted here")
        return fit.law, f"forced by fit.law (out-of-sample error: {table})"
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

    choice = min((n for n in ok if as_good(n)), key=lambda n: (FAMILIES[n].n_params, scores[n]))
    why = f"out-of-sample error {scores[choice]:.2%}"
    why += (
        f", the fewest parameters among the families not significantly worse than the best "
        f"({best} {scores[best]:.2%}; {fit.parsimony:g} paired standard errors)"
        if choice != best
        else ", the lowest"
    )
    if below:
        E = ", ".join(f"{n} {families[n].law.E:.4g}" for n in below)
        why += f"; E below the floor {floor:.4g} ({E}): " + (
            "not chosen"
            if choice not in below
            else "chosen, as no family above it extrapolates (finite error, exponents > 0)"
        )
    return choice, f"{why}; every family: {table}"


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


def _fit_one_family(
    name: str, runs: pd.DataFrame, p: Points, fit: FitParams, held: np.ndarray, log_floor,
    budget: Budget, rng: np.random.Generator, key: str,
) -> FamilyFit:  # fmt: skip
    family = FAMILIES[name]
    N, D = runs.N.to_numpy(), runs.D.to_numpy()
    sizes = np.unique(N)
    rows = [np.ones(len(N))]
    if enough_points(N[~held], D[~held]) is None:
        rows.append((~held).astype(float))
    searches = fit_family(family, p, fit, np.array(rows), log_floor)
    search = searches[0]
    law = search.law
    holdout_law = searches[1].law if len(searches) > 1 else None
    pred_holdout = holdout_law.loss(N, D) if holdout_law is not None else np.full(len(N), np.nan)
    pred_loso = np.full(len(N), np.nan)
    folds = [s for s in sizes if enough_points(N[s != N], D[s != N]) is None and len(sizes) > 2]
    if folds:
        W = np.array([(s != N).astype(float) for s in folds])
        thetas, _ = refit(family, p, fit, W, search)
        for s, theta in zip(folds, thetas, strict=True):
            pred_loso[s == N] = family.law(theta, log_floor).loss(N[s == N], D[s == N])
    boot = bootstrap(runs, p, search, fit, rng, f"bootstrap {key} {name}") if fit.bootstrap else {}
    return FamilyFit(name, law, search, exponents(law, budget, fit), law.loss(N, D),
                     pred_holdout, pred_loso, holdout_law, boot)  # fmt: skip


def fit_target(
    runs: pd.DataFrame,
    arch: str,
    target: str,
    fit: FitParams,
    seed: int = 0,
    floor: float | None = None,
) -> TargetFit:
    """Fit one (arch, target): every family of ``fit.families`` (``floor`` only with a known
    floor), each with its exponents, extrapolation checks and bootstrap; choose one
    (:func:`choose`); the frontier."""
    key = f"{arch}/{target}"
    check_runs(runs, key)
    runs = runs[["N", "D", "loss", "C"]].astype(float).reset_index(drop=True)
    N, D, C, L = (runs[c].to_numpy() for c in ("N", "D", "C", "loss"))
    p = Points.of(N, D, L)
    budget = Budget.of(N, D, C)
    frontier = loss_frontier(C, L)
    held = holdout_mask(C, fit.holdout_fraction)
    if enough_points(N[~held], D[~held]):
        log.warning("%s: no extrapolation check: the held-in runs have %s", key,
                    enough_points(N[~held], D[~held]))  # fmt: skip
    names = [n for n in fit.families if not (FAMILIES[n].needs_floor and floor is None)]
    if fit.law not in ("auto", *names):
        raise FitError(
            f"{key}: fit.law is {fit.law!r} but the fitted families are {', '.join(names)}"
            + (
                " (the floor family needs a known floor: --floors info.json)"
                if fit.law == "floor"
                else ""
            )
        )
    log_floor = math.log(floor) if floor is not None else None
    families = {}
    for name in names:
        rng = np.random.default_rng(
            [seed, int(hashlib.sha256(f"{key}/{name}".encode()).hexdigest()[:8], 16)]
        )
        families[name] = _fit_one_family(name, runs, p, fit, held, log_floor, budget, rng, key)
    choice, why = choose(families, L, held, floor, fit)
    chosen = families[choice]
    law = chosen.law
    if law.degenerate or law.E / L.min() <= 1e-3:
        log.warning(
            "%s: degenerate fit (%s: E=%.3g, alpha=%.3g, beta=%.3g): a term of the law is "
            "switched off; the runs do not pin the law down (too few, too noisy or too narrow "
            "a range)", key, choice, law.E, law.alpha, law.beta,
        )  # fmt: skip
    runs["pred"], runs["pred_holdout"], runs["pred_loso"] = (
        chosen.pred, chosen.pred_holdout, chosen.pred_loso
    )  # fmt: skip
    runs["heldout"] = held
    runs["on_frontier"] = False
    runs.loc[frontier["hull"], "on_frontier"] = True
    log.info("%s: %s law, E=%.4g alpha=%.4f beta=%.4f (%d runs, %d/%d local searches at the "
             "best); %s", key, choice, law.E, law.alpha, law.beta, len(runs),
             chosen.search.n_at_best, chosen.search.n_lbfgs, why)  # fmt: skip
    return TargetFit(arch, target, runs, budget, frontier, families, choice, why, floor, fit.ci)


# ------------------------------------------------------------------------- the table


def prepare_runs(df: pd.DataFrame) -> pd.DataFrame:
    """Check and normalise a runs table to long form: arch, target, N, D, loss, C.

    Accepted: columns N, D, loss (required) and arch, target, C, N_v, D_v (optional); or, instead
    of ``loss``/``target``, one column ``loss_<target>`` per target (e.g. loss_caption, loss_avg).
    A missing arch or target is ``all``. Without ``C``: C = 6(N D + N_v D_v) (paper Sec. 3.1),
    where a missing N_v, D_v (early fusion rows of a mixed table) counts as 0. The grid's
    results/runs.parquet fits as is: rows whose ``status`` is not ``ok`` are dropped, and when
    its ``mixture`` column has several values each mixture is its own arch, ``<arch>-<mixture>``
    (paper Table 3 fits each mixture separately).
    """
    df = df.copy()
    if "status" in df.columns:
        ok = df["status"].astype(str) == "ok"
        if (~ok).any():
            log.warning("dropped %d run(s) whose status is not ok", int((~ok).sum()))
        df = df[ok]
    columns = ["arch", "target", "N", "D", "loss", "C"]
    if "arch" in df.columns:
        df["arch"] = df["arch"].astype(str)
    columns += split_experts(df)
    several_mixtures = "mixture" in df.columns and df["mixture"].nunique() > 1
    if several_mixtures:
        arch = df["arch"] if "arch" in df.columns else DEFAULT_ARCH
        df["base_arch"] = arch
        df["arch"] = arch + "-" + df["mixture"].astype(str)
        columns += ["base_arch", "mixture"]
        if "moe_arch" in df.columns:
            df["moe_arch"] = df["moe_arch"].where(
                df["moe_arch"].isna(), df["moe_arch"] + "-" + df["mixture"].astype(str)
            )
    wide = [c for c in df.columns if isinstance(c, str) and c.startswith("loss_")]
    if "loss" not in df.columns and wide:
        if "target" in df.columns:
            raise FitError("runs table has both a target column and loss_<target> columns")
        keep = [c for c in df.columns if c not in wide]
        df = df.melt(id_vars=keep, value_vars=wide, var_name="target", value_name="loss")
        df["target"] = df["target"].str.removeprefix("loss_")
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise FitError(
            f"runs table lacks column(s) {', '.join(missing)}: required N, D, loss (or "
            f"loss_<target>); optional arch, target, C, N_v, D_v; it has {', '.join(map(str, df.columns))}"
        )
    for col, default in (("arch", DEFAULT_ARCH), ("target", DEFAULT_TARGET)):
        df[col] = df[col].astype(str) if col in df.columns else default
    numeric = [c for c in ("N", "D", "loss", "C", "N_v", "D_v") if c in df.columns]
    for col in numeric:
        try:
            df[col] = pd.to_numeric(df[col]).astype(float)
        except (ValueError, TypeError):
            raise FitError(f"runs table column {col} is not numeric") from None
    if "C" not in df.columns:
        vision = [c for c in ("N_v", "D_v") if c in df.columns]
        if len(vision) == 1:
            raise FitError(
                f"runs table has {vision[0]} but not its pair: late-fusion C needs N_v and D_v"
            )
        extra = df.N_v.fillna(0) * df.D_v.fillna(0) if vision else 0.0
        df["C"] = 6 * (df.N * df.D + extra)
    return df[columns]


def split_experts(df: pd.DataFrame) -> list[str]:
    """MoE runs of several expert counts (``n_experts``, ``top_k``, or ``sparsity`` S = 1 -
    top_k/n_experts): each count is its own arch, ``<arch>-e<n>``, for the (N, D) laws; the
    columns ``moe_arch`` (the arch they share) and ``sparsity`` feed the sparsity-aware law
    (stages/scaling/sparsity.py). Changes ``df`` in place; returns the columns it added (none
    without expert counts)."""
    if "n_experts" not in df.columns and "sparsity" not in df.columns:
        return []
    for col in ("n_experts", "top_k", "sparsity"):
        if col in df.columns:
            try:
                df[col] = pd.to_numeric(df[col]).astype(float)
            except (ValueError, TypeError):
                raise FitError(f"runs table column {col} is not numeric") from None
    if "sparsity" not in df.columns:
        top_k = df["top_k"] if "top_k" in df.columns else 1.0
        df["sparsity"] = 1.0 - top_k / df["n_experts"]
    bad = df["sparsity"].notna() & ~df["sparsity"].between(0.0, 1.0, inclusive="left")
    if bad.any():
        raise FitError(f"runs table: {int(bad.sum())} run(s) with a sparsity outside [0, 1)")
    if "n_experts" not in df.columns:
        df["n_experts"] = np.nan
    arch = df["arch"] if "arch" in df.columns else pd.Series(DEFAULT_ARCH, index=df.index)
    moe = df["sparsity"].notna()
    df["moe_arch"] = arch.where(moe, None)
    counts = df[moe].groupby(arch[moe])["sparsity"].nunique()
    swept = moe & arch.isin(counts[counts > 1].index)
    arch = arch.astype(object)
    for i in df.index[swept]:
        n, s = df.at[i, "n_experts"], df.at[i, "sparsity"]
        arch.at[i] = f"{arch.at[i]}-e{int(n)}" if pd.notna(n) else f"{arch.at[i]}-S{s:.4g}"
    df["arch"] = arch.astype(str)
    return ["moe_arch", "sparsity", "n_experts"]


def load_runs(path: str | Path) -> pd.DataFrame:
    """Read a runs table (.csv, .tsv or .parquet) and :func:`prepare_runs` it."""
    path = Path(path)
    if not path.exists():
        raise FitError(f"runs table {path} not found")
    if path.suffix == ".csv":
        df = pd.read_csv(path)
    elif path.suffix == ".tsv":
        df = pd.read_csv(path, sep="\t")
    elif path.suffix in (".parquet", ".pq"):
        df = pd.read_parquet(path)
    else:
        raise FitError(
            f"runs table {path}: unknown format {path.suffix!r} (allowed .csv, .tsv, .parquet)"
        )
    return prepare_runs(df)


def fit_table(
    df: pd.DataFrame,
    fit: FitParams,
    seed: int = 0,
    floors: dict[str, float] | None = None,
    mixtures: dict[str, dict[str, float]] | None = None,
) -> dict[str, TargetFit]:
    """Fit every (arch, target) of a prepared runs table; keys are ``arch/target``. ``floors``:
    the known floor of each target (for the ``floor`` family), e.g. from the shards' info.json;
    ``mixtures``: each mixture's share per kind (params ``grid.mixtures``), recorded with the
    fits of a table with several mixtures (paper Table 3).

    A target that cannot be fitted raises :class:`FitError` (``fit.on_bad_target: error``) or is
    skipped with a warning (``skip``).
    """
    fits: dict[str, TargetFit] = {}
    for (arch, target), runs in df.groupby(["arch", "target"], sort=True):
        floor = (floors or {}).get(str(target))
        try:
            f = fit_target(runs, str(arch), str(target), fit, seed, floor)
            if "mixture" in runs.columns:
                name = str(runs["mixture"].iloc[0])
                f.mixture = {"base_arch": str(runs["base_arch"].iloc[0]), "name": name,
                             "shares": (mixtures or {}).get(name)}  # fmt: skip
            fits[f"{arch}/{target}"] = f
        except FitError as e:
            if fit.on_bad_target == "error":
                raise
            log.warning("skipped: %s", e)
    if not fits:
        raise FitError("no (arch, target) in the runs table could be fitted")
    return fits


def finite(obj: Any) -> Any:
    """NaN and infinities as None (JSON null), recursively: fits.json stays strict JSON."""
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def write_metrics(fits: dict[str, TargetFit], path: str | Path) -> dict[str, Any]:
    """Write fits.json: ``{"arch/target": {number, ..., "bootstrap": {q: {mean, std, low, high}}}}``."""
    metrics = finite({k: f.metrics() for k, f in fits.items()})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(metrics, indent=2, allow_nan=False) + "\n")
    return metrics
