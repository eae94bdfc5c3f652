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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from stages.params import FitParams
from stages.scaling.law import (
    Budget,
    Law,
    Points,
    SearchResult,
    best_of,
    enough_points,
    errors,
    exponents,
    fit_law,
    holdout_mask,
    loss_frontier,
    start_grid,
)

log = logging.getLogger(__name__)

REQUIRED = ("N", "D", "loss")
DEFAULT_ARCH = DEFAULT_TARGET = "all"
BOOT_KEYS = ("E", "A", "B", "alpha", "beta", "a", "b", "d")
BOOT_KEYS += ("a_regression", "b_regression", "d_regression", "c")


class FitError(ValueError):
    """The runs table cannot be fitted; the message names the arch/target or the columns."""


@dataclass
class TargetFit:
    """Everything fitted for one (arch, target); :meth:`metrics` is its fits.json entry."""

    arch: str
    target: str
    runs: pd.DataFrame  # N, D, loss, C, pred, pred_holdout, heldout, on_frontier
    law: Law
    budget: Budget
    search: SearchResult
    exponents: dict[str, float]
    frontier: dict[str, Any]
    holdout_law: Law | None
    boot: dict[str, np.ndarray] = field(default_factory=dict)
    ci: float = 0.95

    @property
    def key(self) -> str:
        return f"{self.arch}/{self.target}"

    def metrics(self) -> dict[str, Any]:
        r = self.runs
        out: dict[str, Any] = {
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
        out.update({f"fit_{k}": v for k, v in errors(r.pred.values, r.loss.values).items()})
        held = r.heldout.values
        out["heldout_points"] = int(held.sum())
        if self.holdout_law is not None:
            p, obs = r.pred_holdout.values, r.loss.values
            out.update({f"heldin_{k}": v for k, v in errors(p[~held], obs[~held]).items()})
            out.update({f"heldout_{k}": v for k, v in errors(p[held], obs[held]).items()})
        if self.boot:
            out["bootstrap"] = {
                "resamples": len(self.boot["E"]),
                "level": self.ci,
                **{k: interval(v, self.ci) for k, v in self.boot.items()},
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
    grid starts. Returns per quantity an array over resamples.
    """
    N, D, C, L = (runs[c].to_numpy(float) for c in ("N", "D", "C", "loss"))
    n = len(runs)
    starts = np.vstack([search.theta, search.top_starts])
    out: dict[str, list[float]] = {k: [] for k in BOOT_KEYS}
    for _ in tqdm(
        range(fit.bootstrap), desc=desc, unit="fit", mininterval=1, leave=False, disable=None
    ):
        for _try in range(1000):
            counts = rng.multinomial(n, np.full(n, 1.0 / n))
            idx = np.flatnonzero(counts)
            if enough_points(N[idx], D[idx]) is None:
                break
        else:
            raise FitError(f"{desc}: no bootstrap resample can identify the law")
        theta = best_of(starts, p.subset(idx, counts[idx].astype(float)), fit.huber_delta)[0]
        law = Law.from_theta(theta)
        budget = Budget.of(N[idx], D[idx], C[idx])
        values = {
            **law.as_dict(),
            **exponents(law, budget, fit),
            "c": loss_frontier(C[idx], L[idx])["c"],
        }
        for k in BOOT_KEYS:
            out[k].append(values[k])
    return {k: np.array(v, float) for k, v in out.items()}


def fit_target(
    runs: pd.DataFrame,
    arch: str,
    target: str,
    fit: FitParams,
    seed: int = 0,
    grid: np.ndarray | None = None,
) -> TargetFit:
    """Fit one (arch, target): the law, its exponents, frontier, extrapolation check, bootstrap."""
    key = f"{arch}/{target}"
    check_runs(runs, key)
    runs = runs[["N", "D", "loss", "C"]].astype(float).reset_index(drop=True)
    N, D, C, L = (runs[c].to_numpy() for c in ("N", "D", "C", "loss"))
    grid = start_grid(fit) if grid is None else grid
    p = Points.of(N, D, L)
    search = fit_law(p, fit, grid)
    law = search.law
    budget = Budget.of(N, D, C)
    frontier = loss_frontier(C, L)
    runs["pred"] = law.loss(N, D)
    runs["on_frontier"] = False
    runs.loc[frontier["hull"], "on_frontier"] = True

    held = holdout_mask(C, fit.holdout_fraction)
    runs["heldout"] = held
    runs["pred_holdout"] = np.nan
    holdout_law = None
    why = enough_points(N[~held], D[~held])
    if why:
        log.warning("%s: no extrapolation check: the held-in runs have %s", key, why)
    else:
        holdout_law = fit_law(p.subset(~held), fit, grid).law
        runs["pred_holdout"] = holdout_law.loss(N, D)

    if not (law.alpha > 0 and law.beta > 0 and law.E / L.min() > 1e-3):
        log.warning(
            "%s: degenerate fit (E=%.3g, alpha=%.3g, beta=%.3g): a term of the law is switched "
            "off; the runs do not pin the law down (too few, too noisy or too narrow a range)",
            key, law.E, law.alpha, law.beta,
        )  # fmt: skip
    rng = np.random.default_rng([seed, int(hashlib.sha256(key.encode()).hexdigest()[:8], 16)])
    boot = bootstrap(runs, p, search, fit, rng, f"bootstrap {key}") if fit.bootstrap else {}
    log.info(
        "%s: E=%.4g A=%.4g B=%.4g alpha=%.4f beta=%.4f (%d runs, %d/%d L-BFGS runs at the best)",
        key, law.E, law.A, law.B, law.alpha, law.beta, len(runs), search.n_at_best, search.n_lbfgs,
    )  # fmt: skip
    return TargetFit(
        arch, target, runs, law, budget, search, exponents(law, budget, fit), frontier,
        holdout_law, boot, fit.ci,
    )  # fmt: skip


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
    if "mixture" in df.columns and df["mixture"].nunique() > 1:
        arch = df["arch"].astype(str) if "arch" in df.columns else DEFAULT_ARCH
        df["arch"] = arch + "-" + df["mixture"].astype(str)
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
    return df[["arch", "target", "N", "D", "loss", "C"]]


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


def fit_table(df: pd.DataFrame, fit: FitParams, seed: int = 0) -> dict[str, TargetFit]:
    """Fit every (arch, target) of a prepared runs table; keys are ``arch/target``.

    A target that cannot be fitted raises :class:`FitError` (``fit.on_bad_target: error``) or is
    skipped with a warning (``skip``).
    """
    grid = start_grid(fit)
    fits: dict[str, TargetFit] = {}
    for (arch, target), runs in df.groupby(["arch", "target"], sort=True):
        try:
            fits[f"{arch}/{target}"] = fit_target(runs, str(arch), str(target), fit, seed, grid)
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
