"""The fit of one scaling law per (arch, target) of a runs table: fits, exponents, intervals.

Shukor et al. 2025 (arXiv 2504.07951), App. C: the multi-start Huber/L-BFGS fit of
stages/scaling/law.py, per (arch, target) of a table of runs. From each fitted law come the
compute-optimal exponents N_opt ~ C^a, D_opt ~ C^b, D_opt ~ N_opt^d in closed form and by the
paper's iso-FLOP regression (Sec. 3.1, Table 9), the loss-compute frontier L ~ C^c (convex
hull, Sec. 3.1), bootstrap intervals (App. C, Table 11) and an extrapolation check on the
highest-compute runs (Table 10). Compute is C = 6ND, or 6(N_v D_v + N D) for late fusion when
the table has N_v, D_v (Sec. 3.1).

Input: any table of runs with columns N, D, loss and optionally arch, target, C, N_v, D_v
(stages/scaling/runs.py); output: a :class:`TargetFit` per (arch, target), whose
:meth:`TargetFit.metrics` is its fits.json entry (:func:`write_metrics`). Which family is
reported is stages/scaling/choice.py, the intervals stages/scaling/bootstrap.py. The stage entry
point is stages/fit.py; figures are in stages/scaling/plots.py, MLflow records in
stages/scaling/tracking.py.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from stages.params import FitParams
from stages.scaling import predictive
from stages.scaling.bootstrap import (
    basins,
    bootstrap_resamples,
    bootstrap_values,
    interval,
    refit_bootstraps,
)
from stages.scaling.choice import choose, nanmean
from stages.scaling.families import FAMILIES, Points
from stages.scaling.law import (
    Budget,
    Law,
    SmoothMinLaw,
    enough_points,
    errors,
    exponents,
    holdout_mask,
    loss_frontier,
)
from stages.scaling.runs import FitError
from stages.scaling.search import SearchResult, fit_family, refit

log = logging.getLogger(__name__)


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
    holdout_theta: np.ndarray | None = None  # the hold-out refit's optimum
    loso_thetas: dict[float, np.ndarray] = field(default_factory=dict)  # per left-out size

    @cached_property
    def basins(self) -> dict[str, Any]:
        """Whether the resamples left the optimum's basin (stages/scaling/bootstrap.py)."""
        return basins(self.search, self.boot)

    def residuals(self, obs: np.ndarray) -> np.ndarray:
        """The runs' log residuals about the law, widened for the fitted parameters."""
        return predictive.widened_residuals(obs, self.pred, FAMILIES[self.family].n_params)

    def draws(self) -> list:
        """The laws of the bootstrap resamples (finite, non-degenerate)."""
        return predictive.draw_laws(self.family, self.boot, self.law.as_dict()) if self.boot else []

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
                out[f"{name}_mre_reducible"] = nanmean(np.abs(pred - obs)[mask] / red[mask])
        out["out_of_sample_mre"] = nanmean(self.out_of_sample(obs, held))
        return out


def _mre(pred: np.ndarray, obs: np.ndarray) -> float:
    return nanmean(np.abs(pred - obs) / obs)


@dataclass
class TargetFit:
    """Everything fitted for one (arch, target); :meth:`metrics` is its fits.json entry.

    ``law``, ``search``, ``exponents``, ``holdout_law``, ``boot`` and the ``pred*`` columns of
    ``runs`` are the chosen family's (``choice``); every family's fit is in ``families``."""

    arch: str
    target: str
    runs: pd.DataFrame  # N, D, loss, C, pred, pred_holdout, pred_loso, heldout, on_frontier,
    # heldout_, loso_low/high: prediction intervals of the hold-out and size refits
    budget: Budget
    frontier: dict[str, Any]
    families: dict[str, FamilyFit]
    choice: str
    why: str
    floor: float | None = None
    ci: float = 0.95
    mixture: dict[str, Any] | None = None  # base_arch, name and shares when a grid has several
    tied: list[str] = field(default_factory=list)  # the families a prediction's interval spans
    # out of sample: the errors of predicting each unseen run by a mean loss, and whether the
    # chosen law does better (a law that does not describes the runs it was fitted on only)
    baseline_mre: float = math.nan
    extrapolates: bool | None = None  # None: no run both predict out of sample

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

    def prediction(self) -> dict[str, Any] | None:
        """What a prediction's interval needs (stages/scaling/predictive.py), None without a
        bootstrap."""
        if not (self.boot and self.tied):
            return None
        obs = self.runs.loss.to_numpy(float)
        tied = {}
        for n in self.tied:
            f = self.families[n]
            tied[n] = (f.law, f.boot, f.residuals(obs), f.basins["one_basin"])
        return finite(predictive.block(tied, self.tied, self.ci))

    def _bootstrap(self, f: FamilyFit) -> dict[str, Any]:
        """A family's bootstrap summary: per quantity an interval, except the law's parameters
        the family fixes (``{"fixed": why}``: no zero-width interval), and its ``basins``."""
        some = next(iter(f.boot.values()))
        fixed = set(f.law.as_dict()) - set(predictive.PARAMS[f.family])
        why = {"beta": "= alpha (one exponent)", "E": "the corpus's floor"}
        return {"resamples": len(some), "level": self.ci,
                **{k: ({"fixed": why.get(k, "by the family")} if k in fixed
                       else interval(v, self.ci)) for k, v in f.boot.items()},
                "basins": f.basins}  # fmt: skip

    def metrics(self) -> dict[str, Any]:
        r = self.runs
        obs, held = r.loss.to_numpy(), r.heldout.to_numpy()
        out: dict[str, Any] = {
            "law": self.choice,
            "law_why": self.why,
            "extrapolates": self.extrapolates,
            "baseline_out_of_sample_mre": self.baseline_mre,
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
            out["bootstrap"] = self._bootstrap(self.chosen)
        prediction = self.prediction()
        if prediction is not None:
            out["prediction"] = prediction
            out["coverage"] = coverage(r, self.ci)
        out["families"] = {
            name: {
                **f.law.as_dict(),
                "n_params": FAMILIES[name].n_params,
                "degenerate": f.law.degenerate,
                **f.exponents,
                **f.errors(obs, held, self.floor),
                **({"bootstrap": self._bootstrap(f)} if f.boot else {}),
            }
            for name, f in self.families.items()
        }
        return out


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
    loso_thetas = {}
    # the leave-one-size-out refits and the bootstrap's, from the same starts: one batch
    W_loso = np.array([(s != N).astype(float) for s in folds]).reshape(len(folds), len(N))
    W_boot = (
        bootstrap_resamples(runs, fit, rng, f"bootstrap {key} {name}")
        if fit.bootstrap
        else np.empty((0, len(N)))
    )
    thetas = (
        refit(family, p, fit, np.vstack([W_loso, W_boot]), search)[0]
        if len(W_loso) + len(W_boot)
        else np.empty((0, len(search.theta)))
    )
    for s, theta in zip(folds, thetas[: len(folds)], strict=True):
        pred_loso[s == N] = family.law(theta, log_floor).loss(N[s == N], D[s == N])
        loso_thetas[float(s)] = theta
    boot = (
        bootstrap_values(runs, search, fit, W_boot, thetas[len(folds) :]) if fit.bootstrap else {}
    )
    return FamilyFit(name, law, search, exponents(law, budget, fit), law.loss(N, D),
                     pred_holdout, pred_loso, holdout_law, boot,
                     searches[1].theta if len(searches) > 1 else None, loso_thetas)  # fmt: skip


def seeded(seed: int, label: str) -> np.random.Generator:
    """A generator of its own per ``label`` (a fit's family, its refits): adding or reordering
    families or fits changes no other draws."""
    return np.random.default_rng([seed, int(hashlib.sha256(label.encode()).hexdigest()[:8], 16)])


COVERAGE_FOLDS = 8
"""At most this many model sizes (spread from the smallest to the largest) get a bootstrapped
leave-one-size-out refit for the coverage check: a table whose every run has its own N (a
reconstruction from a figure) would otherwise cost a bootstrap per run."""


def interval_checks(
    tied: list[FamilyFit], runs: pd.DataFrame, p: Points, fit: FitParams, held: np.ndarray,
    seed: int, key: str,
) -> dict[str, np.ndarray]:  # fmt: skip
    """Each run's prediction interval (stages/scaling/predictive.py: the union over the ``tied``
    families) from the refit that did not see it, to measure coverage: the top-compute hold-out
    (``heldout``, held-out runs only) and the leave-one-size-out refits (``loso``, at most
    :data:`COVERAGE_FOLDS` sizes). The refits' intervals are built as
    the full fit's: their own bootstrap (:func:`refit_bootstraps`) and residuals. Columns
    ``<which>_low``/``<which>_high``, NaN where there is no refit."""
    N, D, L = (runs[c].to_numpy(float) for c in ("N", "D", "loss"))
    n, ci = len(runs), fit.ci
    out: dict[str, list] = {"heldout": [], "loso": []}
    for f in tied:
        family = FAMILIES[f.family]
        refits = []  # (which, the runs it was fitted on, its optimum, the runs it predicts)
        if f.holdout_theta is not None:
            refits.append(("heldout", ~held, f.holdout_theta, held))
        sizes = sorted(f.loso_thetas)
        pick = sorted({sizes[i] for i in np.linspace(0, len(sizes) - 1, COVERAGE_FOLDS).round()
                       .astype(int)}) if sizes else []  # fmt: skip
        refits += [("loso", s != N, f.loso_thetas[s], s == N) for s in pick]
        cols = {w: (np.full(n, np.nan), np.full(n, np.nan)) for w in ("heldout", "loso")}
        if not (refits and fit.bootstrap):
            refits = []  # no refit to check: NaN, and the union has no interval there
        rng = seeded(seed, f"{key}/{f.family}/refits")
        boots = refit_bootstraps(runs, p, f.search, fit, [r[1:3] for r in refits], rng, key)
        for (which, mask, theta, target), thetas in zip(refits, boots, strict=True):
            law = family.law(theta, f.search.log_floor)
            laws = [family.law(t, f.search.log_floor) for t in thetas if np.isfinite(t).all()]
            r = predictive.widened_residuals(L[mask], law.loss(N[mask], D[mask]), family.n_params)
            lo, hi = predictive.family_interval([x for x in laws if not x.degenerate], r,
                                                N[target], D[target], ci)  # fmt: skip
            cols[which][0][target], cols[which][1][target] = lo, hi
        for which, pair in cols.items():
            out[which].append(pair)
    result = {}
    for which, intervals in out.items():
        result[f"{which}_low"], result[f"{which}_high"] = predictive.union(intervals, (n,))
    return result


def coverage(runs: pd.DataFrame, ci: float) -> dict[str, Any]:
    """The share of runs inside the interval of the refit that did not see them: the
    top-compute hold-out and leave-one-size-out (runs with an interval only), and how many."""
    L = runs.loss.to_numpy(float)
    out: dict[str, Any] = {"level": ci}
    for which in ("heldout", "loso"):
        lo, hi = runs[f"{which}_low"].to_numpy(float), runs[f"{which}_high"].to_numpy(float)
        ok = np.isfinite(lo) & np.isfinite(hi)
        inside = (L[ok] >= lo[ok]) & (L[ok] <= hi[ok])
        out[which] = float(inside.mean()) if ok.any() else math.nan
        out[f"{which}_n"] = int(ok.sum())
    return out


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
        rng = seeded(seed, f"{key}/{name}")
        families[name] = _fit_one_family(name, runs, p, fit, held, log_floor, budget, rng, key)
    choice, why, tied = choose(families, L, held, floor, fit)
    chosen = families[choice]
    baseline = baseline_errors(L, runs.N.to_numpy(), held)
    mre, base = versus_baseline(chosen, L, held, baseline)
    extrapolates = None if math.isnan(mre) else bool(mre <= base)
    if extrapolates is False:
        pairs = {n: versus_baseline(f, L, held, baseline) for n, f in families.items()}
        better = [n for n, (m, b) in pairs.items() if m <= b]
        why += (
            f"; it predicts the runs it did not see worse than their mean loss does ({mre:.2%} "
            f"against {base:.2%}): it describes the runs it was fitted on, not beyond them; "
            + (
                f"the families that do better ({', '.join(better)}) were not chosen (above)"
                if better
                else "no family extrapolates here"
            )
        )
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
    checks = interval_checks([families[n] for n in tied], runs, p, fit, held, seed, key)
    for col, values in checks.items():
        runs[col] = values
    runs.loc[frontier["hull"], "on_frontier"] = True
    log.info("%s: %s law, E=%.4g alpha=%.4f beta=%.4f (%d runs, %d/%d local searches at the "
             "best); %s", key, choice, law.E, law.alpha, law.beta, len(runs),
             chosen.search.n_at_best, chosen.search.n_lbfgs, why)  # fmt: skip
    return TargetFit(arch, target, runs, budget, frontier, families, choice, why, floor, fit.ci,
                     tied=tied, baseline_mre=base, extrapolates=extrapolates)  # fmt: skip


def versus_baseline(
    f: FamilyFit, obs: np.ndarray, held: np.ndarray, baseline: np.ndarray
) -> tuple[float, float]:
    """A family's mean out-of-sample relative error and the baseline's (:func:`baseline_errors`),
    over the same runs: those both predict (a refit that was not possible leaves NaN)."""
    errors = f.out_of_sample(obs, held)
    both = np.isfinite(errors) & np.isfinite(baseline)
    if not both.any():
        return math.nan, math.nan
    return float(errors[both].mean()), float(baseline[both].mean())


def baseline_errors(obs: np.ndarray, sizes: np.ndarray, held: np.ndarray) -> np.ndarray:
    """The out-of-sample errors (as :meth:`FamilyFit.out_of_sample` orders them) of a predictor
    without a law: each top-compute run predicted by the mean loss of the others, each size's
    runs by the mean loss of the other sizes'. A law worse than this does not extrapolate."""
    rest = obs[~held].mean() if (~held).any() else np.nan
    pred = np.full_like(obs, np.nan)
    for size in np.unique(sizes):
        other = sizes != size
        if other.any():
            pred[~other] = obs[other].mean()
    return np.concatenate([np.abs(rest - obs[held]) / obs[held], np.abs(pred - obs) / obs])


# ------------------------------------------------------------------------- the table


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
    path.write_text(dumps(metrics) + "\n")
    return metrics


_NUMBERS = re.compile(r"\[\s*((?:-?[0-9.eE+-]+|null)(?:,\s*(?:-?[0-9.eE+-]+|null))*)\s*\]")


def dumps(metrics: dict[str, Any]) -> str:
    """Strict JSON, indented, with every list of numbers on one line (the resamples a prediction
    interval needs stay a few lines per fit; `dvc metrics show` skips lists)."""
    text = json.dumps(metrics, indent=2, allow_nan=False)
    return _NUMBERS.sub(lambda m: "[" + ", ".join(re.split(r",\s*", m.group(1))) + "]", text)
