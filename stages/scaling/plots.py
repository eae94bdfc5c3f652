"""Figures of the scaling-law fits (stages/scaling/fit.py), each PNG beside the CSV of what it plots.

Per arch: loss vs compute with the fitted frontier L = c_coef C^c (paper Fig. 2). Per arch and
target: iso-FLOP curves of the fitted law with N_opt marked (Fig. 3), and predicted vs observed
loss with the held-out (highest-compute) runs highlighted (Table 10). The CSVs are what
``dvc plots`` renders. Figures are drawn headless (stages/common/figures.py).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd

from stages.common.figures import plain_log_y, save, slug, subplots
from stages.scaling.fit import TargetFit

log = logging.getLogger(__name__)
ISOFLOP_BUDGETS = 6  # curves per iso-FLOP figure


def loss_vs_compute(fits: list[TargetFit], out: Path, data: Path) -> list[Path]:
    """One arch: every target's runs (loss vs C, log-log), frontier vertices and fitted line."""
    arch = fits[0].arch
    rows = []
    fig, ax = subplots(figsize=(6.4, 4.4))
    for i, f in enumerate(fits):
        r, fr = f.runs, f.frontier
        line = fr["c_coef"] * r.C.to_numpy() ** fr["c"]
        rows.append(
            r.assign(target=f.target, frontier=line)[
                ["target", "N", "D", "C", "loss", "on_frontier", "frontier"]
            ]
        )
        color = f"C{i % 10}"
        ax.scatter(r.C, r.loss, s=12, alpha=0.5, color=color, label=f"{f.target}")
        ax.scatter(r.C[r.on_frontier], r.loss[r.on_frontier], s=30, color=color, edgecolor="k")
        if np.isfinite(fr["c"]):
            C = np.geomspace(r.C.min(), r.C.max(), 50)
            ax.plot(
                C,
                fr["c_coef"] * C ** fr["c"],
                color=color,
                lw=1.5,
                label=f"{fr['c_coef']:.3g} C^{fr['c']:.4f}",
            )
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="compute C (FLOPs)",
        ylabel="validation loss",
        title=f"{arch}: loss vs compute",
    )
    plain_log_y(ax)
    ax.legend(fontsize=7)
    csv = data / f"loss_compute_{slug(arch)}.csv"
    pd.concat(rows).to_csv(csv, index=False)
    return [save(fig, out / f"loss_compute_{slug(arch)}.png"), csv]


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


def predicted_vs_observed(f: TargetFit, out: Path, data_dir: Path) -> list[Path]:
    """Observed loss vs the prediction of the fit made without the held-out runs (if any)."""
    r = f.runs
    pred = r.pred_holdout if r.pred_holdout.notna().all() else r.pred
    data = pd.DataFrame(
        {"N": r.N, "D": r.D, "C": r.C, "observed": r.loss, "predicted": pred, "heldout": r.heldout}
    )
    fig, ax = subplots(figsize=(4.8, 4.6))
    held = data.heldout.to_numpy()
    bad = ~np.isfinite(data.predicted.to_numpy(float))
    if bad.any():  # a degenerate law can overflow (A N^-alpha with A = 0, alpha < 0)
        ax.text(0.02, 0.98, f"{bad.sum()} prediction(s) not finite", transform=ax.transAxes,
                va="top", fontsize=7)  # fmt: skip
        held = held & ~bad
    shown = data[~bad]
    ax.scatter(data.observed[~held & ~bad], data.predicted[~held & ~bad], s=14, label="held-in")
    ax.scatter(
        data.observed[held], data.predicted[held], s=28, color="C3", label="held-out (top C)"
    )
    lim = [
        min(shown.observed.min(), shown.predicted.min()),
        max(shown.observed.max(), shown.predicted.max()),
    ]
    ax.plot(lim, lim, "k--", lw=0.8)
    ax.set(xlabel="observed loss", ylabel="predicted loss", title=f"{f.key}: extrapolation")
    ax.legend(fontsize=7)
    stem = f"pred_obs_{slug(f.arch)}_{slug(f.target)}"
    data.to_csv(data_dir / f"{stem}.csv", index=False)
    return [save(fig, out / f"{stem}.png"), data_dir / f"{stem}.csv"]


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
        files[arch] = loss_vs_compute(group, out, data)
        for f in group:
            files[f.key] = isoflop(f, out, data) + predicted_vs_observed(f, out, data)
    log.info("wrote %d figures to %s", sum(len(v) for v in files.values()) // 2, out)
    return files
