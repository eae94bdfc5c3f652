"""Figures of the scaling-law fits (stages/fit.py), each PNG beside the CSV of what it plots.

Per arch: loss vs compute with the fitted frontier L = c_coef C^c (paper Fig. 2). Per arch and
target: iso-FLOP curves of the fitted law with N_opt marked (Fig. 3), and predicted vs observed
loss with the held-out (highest-compute) runs highlighted (Table 10). The CSVs are what
``dvc plots`` renders; matplotlib runs headless (Agg).
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from stages.fit import TargetFit  # noqa: E402

log = logging.getLogger(__name__)
ISOFLOP_BUDGETS = 6  # curves per iso-FLOP figure


def slug(name: str) -> str:
    """A file-name-safe form of an arch or target name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "x"


def _plain_log_y(ax: plt.Axes) -> None:
    """Loss ticks as plain numbers (3.5, not 3.5 x 10^0) on a log axis."""
    ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%.2g"))


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def loss_vs_compute(fits: list[TargetFit], out: Path) -> list[Path]:
    """One arch: every target's runs (loss vs C, log-log), frontier vertices and fitted line."""
    arch = fits[0].arch
    rows = []
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
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
    _plain_log_y(ax)
    ax.legend(fontsize=7)
    csv = out / f"loss_compute_{slug(arch)}.csv"
    pd.concat(rows).to_csv(csv, index=False)
    return [_save(fig, out / f"loss_compute_{slug(arch)}.png"), csv]


def isoflop(f: TargetFit, out: Path) -> list[Path]:
    """Fitted L along iso-FLOP lines C = 6 ratio N D, with the closed-form N_opt of each."""
    b, law = f.budget, f.law
    C = np.geomspace(b.C_min, b.C_max, ISOFLOP_BUDGETS)
    N_lo, N_hi = f.runs.N.min() / 10, f.runs.N.max() * 10
    N = np.geomspace(N_lo, N_hi, 200)
    rows = []
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    N_opt, D_opt, L_opt = law.optimum(C, b.ratio)
    for i, c in enumerate(C):
        D = c / (6 * b.ratio * N)
        L = law.loss(N, D)
        rows.append(pd.DataFrame({"C": c, "N": N, "D": D, "L": L, "optimum": False}))
        ax.plot(N, L, color=f"C{i}", lw=1.2, label=f"C={c:.2g}")
    opt = pd.DataFrame({"C": C, "N": N_opt, "D": D_opt, "L": L_opt, "optimum": True})
    rows.append(opt)
    ax.scatter(N_opt, L_opt, marker="*", s=90, color="k", zorder=3, label="N_opt")
    # a degenerate fit (an exponent <= 0) has no finite optimum: plot what there is, linearly
    finite = np.isfinite(L_opt) & (L_opt > 0)
    ax.set(
        xscale="log",
        yscale="log" if finite.any() else "linear",
        xlabel="parameters N",
        ylabel="fitted loss",
        title=f"{f.key}: iso-FLOP curves" + ("" if finite.any() else " (degenerate fit)"),
    )
    if finite.any():
        lo, hi = np.min(L_opt[finite]), f.runs.loss.max()
        if hi > lo:
            ax.set_ylim(lo * 0.97, hi * 1.05)
        _plain_log_y(ax)
    ax.legend(fontsize=7)
    stem = f"isoflop_{slug(f.arch)}_{slug(f.target)}"
    pd.concat(rows).to_csv(out / f"{stem}.csv", index=False)
    return [_save(fig, out / f"{stem}.png"), out / f"{stem}.csv"]


def predicted_vs_observed(f: TargetFit, out: Path) -> list[Path]:
    """Observed loss vs the prediction of the fit made without the held-out runs (if any)."""
    r = f.runs
    pred = r.pred_holdout if r.pred_holdout.notna().all() else r.pred
    data = pd.DataFrame(
        {"N": r.N, "D": r.D, "C": r.C, "observed": r.loss, "predicted": pred, "heldout": r.heldout}
    )
    fig, ax = plt.subplots(figsize=(4.8, 4.6))
    held = data.heldout.to_numpy()
    ax.scatter(data.observed[~held], data.predicted[~held], s=14, label="held-in")
    ax.scatter(
        data.observed[held], data.predicted[held], s=28, color="C3", label="held-out (top C)"
    )
    lim = [
        min(data.observed.min(), data.predicted.min()),
        max(data.observed.max(), data.predicted.max()),
    ]
    ax.plot(lim, lim, "k--", lw=0.8)
    ax.set(xlabel="observed loss", ylabel="predicted loss", title=f"{f.key}: extrapolation")
    ax.legend(fontsize=7)
    stem = f"pred_obs_{slug(f.arch)}_{slug(f.target)}"
    data.to_csv(out / f"{stem}.csv", index=False)
    return [_save(fig, out / f"{stem}.png"), out / f"{stem}.csv"]


def write_plots(fits: dict[str, TargetFit], out: str | Path) -> dict[str, list[Path]]:
    """Write every figure and its CSV into ``out``; returns the files per arch and per arch/target."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    by_arch: dict[str, list[TargetFit]] = defaultdict(list)
    for f in fits.values():
        by_arch[f.arch].append(f)
    files: dict[str, list[Path]] = {}
    for arch, group in by_arch.items():
        files[arch] = loss_vs_compute(group, out)
        for f in group:
            files[f.key] = isoflop(f, out) + predicted_vs_observed(f, out)
    log.info("wrote %d figures to %s", sum(len(v) for v in files.values()) // 2, out)
    return files
