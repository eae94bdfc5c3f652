"""Figures of the scaling-law fits (stages/scaling/fit.py), each PNG beside the CSV of what it plots.

Per arch: loss vs compute with the fitted frontier L = c_coef C^c (paper Fig. 2). Per arch and
target: iso-FLOP curves of the fitted law with N_opt marked (Fig. 3), and predicted vs observed
loss with the held-out (highest-compute) runs highlighted (Table 10). The CSVs are what
``dvc plots`` renders. Figures are drawn headless (stages/common/figures.py).

:func:`loss_vs_compute` and :func:`predicted_vs_observed` draw any number of series: the report
(stages/reporting/figures.py) calls them for all archs at once.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from stages.common.figures import plain_log_y, save, slug, subplots
from stages.scaling.fit import TargetFit

log = logging.getLogger(__name__)
ISOFLOP_BUDGETS = 6  # curves per iso-FLOP figure


@dataclass
class Series:
    """Runs of one arch or target on a loss-vs-compute panel, with the fitted frontier
    L = c_coef C^c (None: no fit) and optionally its vertices highlighted."""

    label: str
    C: np.ndarray
    loss: np.ndarray
    frontier: tuple[float, float] | None  # (c_coef, c)
    on_frontier: np.ndarray | None = None


def loss_vs_compute(panels: dict[str, list[Series]], out: Path, ncols: int = 1) -> Path:
    """Paper Fig. 2: validation loss vs training FLOPs (log-log), one panel per title, each
    series' runs with its fitted frontier. The fit stage draws one panel per arch (its
    targets), the report one per target (its archs)."""
    rows = -(-len(panels) // ncols)
    fig, axes = subplots(rows, ncols, figsize=(5 * ncols + 1.4, 3.8 * rows + 0.6), squeeze=False)
    for ax, (title, series) in zip(axes.flat, panels.items(), strict=False):
        for i, s in enumerate(series):
            color = f"C{i % 10}"
            ax.scatter(s.C, s.loss, s=10, alpha=0.5, color=color)
            if s.on_frontier is not None:
                ax.scatter(s.C[s.on_frontier], s.loss[s.on_frontier], s=30, color=color,
                           edgecolor="k")  # fmt: skip
            if s.frontier is not None and np.isfinite(s.frontier[1]):
                C = np.geomspace(np.min(s.C), np.max(s.C), 50)
                coef, c = s.frontier
                ax.plot(C, coef * C**c, color=color, lw=1.5, label=f"{s.label}: L ∝ C^{c:.3f}")
            else:
                ax.plot([], [], color=color, label=f"{s.label} (no fit)")
        ax.set(xscale="log", yscale="log", xlabel="training FLOPs C", ylabel="validation loss")
        ax.set_title(title, fontsize=9)
        plain_log_y(ax)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    return save(fig, out)


def frontier_series(label: str, f: TargetFit) -> Series:
    """The runs of one fit, its frontier and the frontier's vertices."""
    r, fr = f.runs, f.frontier
    return Series(label, r.C.to_numpy(), r.loss.to_numpy(), (fr["c_coef"], fr["c"]),
                  r.on_frontier.to_numpy(bool))  # fmt: skip


def _loss_vs_compute(fits: list[TargetFit], out: Path, data: Path) -> list[Path]:
    """One arch: every target's runs, frontier vertices and fitted frontier, and its CSV."""
    arch = fits[0].arch
    rows = []
    for f in fits:
        r, fr = f.runs, f.frontier
        line = fr["c_coef"] * r.C.to_numpy() ** fr["c"]
        rows.append(r.assign(target=f.target, frontier=line)[
            ["target", "N", "D", "C", "loss", "on_frontier", "frontier"]])  # fmt: skip
    csv = data / f"loss_compute_{slug(arch)}.csv"
    pd.concat(rows).to_csv(csv, index=False)
    panels = {f"{arch}: loss vs compute": [frontier_series(f.target, f) for f in fits]}
    return [loss_vs_compute(panels, out / f"loss_compute_{slug(arch)}.png"), csv]


def isoflop(f: TargetFit, out: Path, data: Path) -> list[Path]:
    """Fitted L along iso-FLOP lines C = 6 ratio N D, with the closed-form N_opt of each.

    A degenerate fit (an exponent <= 0: a term of the law is off) has no optimum; its figure
    shows the observed runs, loss vs N per token budget, and says so.
    """
    b, law = f.budget, f.law
    stem = f"isoflop_{slug(f.arch)}_{slug(f.target)}"
    fig, ax = subplots(figsize=(6.4, 4.4))
    C = np.geomspace(b.C_min, b.C_max, ISOFLOP_BUDGETS)
    N = np.geomspace(f.runs.N.min() / 10, f.runs.N.max() * 10, 200)
    rows = []
    for c in C:
        D = c / (6 * b.ratio * N)
        rows.append(pd.DataFrame({"C": c, "N": N, "D": D, "L": law.loss(N, D), "optimum": False}))
    finite = np.isfinite(pd.concat(rows).L).any()
    if not (law.alpha > 0 and law.beta > 0 and finite):
        why = "degenerate fit" if finite else "fitted law not finite"
        r = f.runs.sort_values("N")
        for i, (D, g) in enumerate(r.groupby("D")):
            ax.plot(g.N, g.loss, "o-", color=f"C{i % 10}", lw=1, ms=4, label=f"D={D:.3g}")
        ax.set(xscale="log", yscale="log", xlabel="parameters N", ylabel="observed loss")
        ax.set_title(f"{f.key}: {why} (alpha={law.alpha:.3g}, beta={law.beta:.3g}): no N_opt")
        plain_log_y(ax)
        ax.legend(fontsize=7)
        r.assign(optimum=False)[["C", "N", "D", "loss", "optimum"]].rename(
            columns={"loss": "L"}
        ).to_csv(data / f"{stem}.csv", index=False)
        return [save(fig, out / f"{stem}.png"), data / f"{stem}.csv"]
    for i, row in enumerate(rows):
        ax.plot(row.N, row.L, color=f"C{i}", lw=1.2, label=f"C={row.C.iloc[0]:.2g}")
    N_opt, D_opt, L_opt = law.optimum(C, b.ratio)
    rows.append(pd.DataFrame({"C": C, "N": N_opt, "D": D_opt, "L": L_opt, "optimum": True}))
    ax.scatter(N_opt, L_opt, marker="*", s=90, color="k", zorder=3, label="N_opt")
    ax.set(xscale="log", yscale="log", xlabel="parameters N", ylabel="fitted loss")
    ax.set_title(f"{f.key}: iso-FLOP curves")
    with np.errstate(invalid="ignore"):
        lo, hi = np.nanmin(np.where(L_opt > 0, L_opt, np.nan)), f.runs.loss.max()
    if np.isfinite(lo) and hi > lo > 0:
        ax.set_ylim(lo * 0.97, hi * 1.05)
    plain_log_y(ax)
    ax.legend(fontsize=7)
    pd.concat(rows).to_csv(data / f"{stem}.csv", index=False)
    return [save(fig, out / f"{stem}.png"), data / f"{stem}.csv"]


def pred_obs_csv(data: Path, arch: str, target: str) -> Path:
    """Where the fit stage writes the observed and predicted losses of one arch/target (what
    the report draws again, all archs together)."""
    return Path(data) / f"pred_obs_{slug(arch)}_{slug(target)}.csv"


def predicted_vs_observed(series: dict[str, pd.DataFrame], title: str, out: Path) -> Path:
    """Observed vs predicted loss of each series (columns ``observed``, ``predicted``,
    ``heldout``, optionally ``low``/``high``: the held-out runs' prediction intervals, drawn as
    bars: a run is inside when its bar crosses the diagonal), the held-out (top-compute) runs
    starred: how well a law fitted without them extrapolates (paper Table 10). The fit stage draws
    one arch/target, the report every arch."""
    fig, ax = subplots(figsize=(5.2, 4.8))
    lo, hi, bad = np.inf, -np.inf, 0
    for i, (label, d) in enumerate(series.items()):
        finite = np.isfinite(d.predicted.to_numpy(float))
        bad += int((~finite).sum())  # a degenerate law can overflow (A N^-alpha, alpha < 0)
        d = d[finite]
        held = d.heldout.astype(bool).to_numpy()
        color = f"C{i % 10}"
        ax.scatter(d.observed[~held], d.predicted[~held], s=12, color=color, label=label)
        ax.scatter(d.observed[held], d.predicted[held], s=40, color=color, marker="*",
                   edgecolor="k", linewidth=0.5)  # fmt: skip
        if {"low", "high"} <= set(d.columns):
            bar = held & np.isfinite(d.low.to_numpy(float)) & np.isfinite(d.high.to_numpy(float))
            p = d.predicted[bar]
            below, above = np.maximum(p - d.low[bar], 0), np.maximum(d.high[bar] - p, 0)  # (a
            ax.errorbar(d.observed[bar], p, yerr=[below, above], fmt="none",  # union may miss p)
                        ecolor=color, elinewidth=0.8, capsize=2)  # fmt: skip
        if len(d):
            lo = min(lo, d.observed.min(), d.predicted.min())
            hi = max(hi, d.observed.max(), d.predicted.max())
    if np.isfinite(lo):
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
    if bad:
        ax.text(0.02, 0.98, f"{bad} prediction(s) not finite", transform=ax.transAxes,
                va="top", fontsize=7)  # fmt: skip
    ax.scatter([], [], marker="*", color="grey", edgecolor="k", label="held out (top C)")
    if any({"low", "high"} <= set(d.columns) for d in series.values()):
        ax.errorbar([], [], yerr=[], fmt="none", ecolor="grey", label="its prediction interval")
    ax.set(xlabel="observed loss", ylabel="predicted by the held-in fit")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    return save(fig, out)


def _predicted_vs_observed(f: TargetFit, out: Path, data_dir: Path) -> list[Path]:
    """One arch/target: observed vs the prediction of the fit made without the held-out runs
    (if any), and its CSV."""
    r = f.runs
    pred = r.pred_holdout if r.pred_holdout.notna().all() else r.pred
    data = pd.DataFrame(
        {"N": r.N, "D": r.D, "C": r.C, "observed": r.loss, "predicted": pred, "heldout": r.heldout}
    )
    if "heldout_low" in r.columns:  # the held-out runs' prediction intervals (bars)
        data["low"], data["high"] = r.heldout_low, r.heldout_high
    csv = pred_obs_csv(data_dir, f.arch, f.target)
    data.to_csv(csv, index=False)
    png = out / csv.with_suffix(".png").name
    return [predicted_vs_observed({f.target: data}, f"{f.key}: extrapolation", png), csv]


def write_plots(
    fits: dict[str, TargetFit], out: str | Path, data: str | Path | None = None
) -> dict[str, list[Path]]:
    """Write every figure (PNG) into ``out`` and the CSV it plots into ``data`` (default: ``out``).

    Returns the files per arch and per arch/target. (The DVC stage keeps the CSVs apart so that
    ``dvc plots show`` of the figures' folder renders images only.)
    """
    out = Path(out)
    data = out if data is None else Path(data)
    out.mkdir(parents=True, exist_ok=True)
    data.mkdir(parents=True, exist_ok=True)
    by_arch: dict[str, list[TargetFit]] = defaultdict(list)
    for f in fits.values():
        by_arch[f.arch].append(f)
    files: dict[str, list[Path]] = {}
    for arch, group in by_arch.items():
        files[arch] = _loss_vs_compute(group, out, data)
        for f in group:
            files[f.key] = isoflop(f, out, data) + _predicted_vs_observed(f, out, data)
    log.info("wrote %d figures to %s", sum(len(v) for v in files.values()) // 2, out)
    return files
