"""Figures of the report stage (stages/report.py), drawn from this run's runs, fits and points.

Each function takes what stages/report.py loaded and writes one PNG; none reads a constant of
the paper. Figures are drawn headless (stages/common/figures.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.ticker
import numpy as np
import pandas as pd

from stages.common.figures import plain_log_y, save, slug, subplots
from stages.data.kinds import TARGETS
from stages.scaling import plots
from stages.scaling.law import fitted_law
from stages.scaling.plots import Series


def arch_color(archs: list[str]) -> dict[str, str]:
    return {a: f"C{i % 10}" for i, a in enumerate(archs)}


def loss_vs_compute(runs: pd.DataFrame, fits: dict, archs: list[str], out: Path) -> Path:
    """Paper Fig. 2: validation loss vs training FLOPs per arch, with its fitted frontier, one
    panel per target."""
    panels = {}
    for target in TARGETS:
        series = []
        for arch in archs:
            r = runs[runs.arch == arch]
            f = fits.get(f"{arch}/{target}") or {}
            ok = f.get("c") is not None and f.get("c_coef") is not None
            frontier = (f["c_coef"], f["c"]) if ok else None
            series.append(Series(arch, r.C.to_numpy(), r[f"loss_{target}"].to_numpy(), frontier))
        panels[f"{target}: loss vs compute, fitted frontier"] = series
    return plots.loss_vs_compute(panels, out / "loss_vs_compute.png", ncols=2)


def equal_compute(table: pd.DataFrame, out: Path) -> Path:
    """Frontier loss of every arch at the same compute budgets, one panel per data kind."""
    fig, axes = subplots(1, len(TARGETS), figsize=(13, 3.8), sharey=False)
    budgets = sorted(table.C.unique())
    for ax, target in zip(axes, TARGETS, strict=True):
        t = table[table.target == target]
        archs = list(dict.fromkeys(t.arch))
        width = 0.8 / max(1, len(budgets))
        for j, c in enumerate(budgets):
            v = t[t["C"] == c].set_index("arch").reindex(archs).loss
            ax.bar(np.arange(len(archs)) + j * width, v, width, label=f"C={c:.2g}")
        ax.set_xticks(np.arange(len(archs)) + width * (len(budgets) - 1) / 2)
        ax.set_xticklabels(archs, rotation=35, ha="right", fontsize=7)
        lo = np.nanmin(t.loss) if len(t) else 0
        ax.set_ylim(lo * 0.95 if np.isfinite(lo) else 0, None)
        ax.set_title(f"{target}: frontier loss at equal C", fontsize=9)
    axes[0].set_ylabel("loss on the fitted frontier")
    axes[-1].legend(fontsize=7)
    return save(fig, out / "equal_compute.png")


def optimal_allocation(fits: dict, archs: list[str], out: Path) -> Path:
    """N_opt(C) and D_opt(C) of each arch's fitted law (target avg), closed form (App. C)."""
    colors = arch_color(archs)
    fig, (an, ad) = subplots(1, 2, figsize=(10, 4))
    skipped = []
    for arch in archs:
        f = fits.get(f"{arch}/avg")
        law = fitted_law(f)
        if law is None:
            skipped.append(arch)
            continue
        C = np.geomspace(f["C_min"], f["C_max"] * 10, 40)
        N, D, _ = law.optimum(C, f["compute_ratio"])
        an.plot(C, N, color=colors[arch], label=f"{arch}: N_opt ∝ C^{f['a']:.2f}")
        ad.plot(C, D, color=colors[arch], label=f"{arch}: D_opt ∝ C^{f['b']:.2f}")
    for ax, what in ((an, "N_opt (parameters)"), (ad, "D_opt (tokens)")):
        ax.set(xscale="log", yscale="log", xlabel="training FLOPs C", ylabel=what)
        ax.set_title(f"compute-optimal {what.split()[0]} (fitted, avg loss)", fontsize=9)
        if skipped:
            ax.text(0.02, 0.02, f"no optimum (degenerate fit): {', '.join(skipped)}",
                    transform=ax.transAxes, fontsize=7)  # fmt: skip
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    return save(fig, out / "optimal_allocation.png")


def predicted_vs_observed(plot_data: Path, archs: list[str], out: Path) -> Path:
    """Observed vs predicted avg loss of every arch; held-out (top-compute) runs highlighted
    (the fit stage's data: stages/scaling/plots.py)."""
    series = {}
    for arch in archs:
        path = plots.pred_obs_csv(plot_data, arch, "avg")
        if path.exists():
            series[arch] = pd.read_csv(path)
    title = "extrapolation to the highest-compute runs (avg loss)"
    return plots.predicted_vs_observed(series, title, out / "predicted_vs_observed.png")


def moe_routing(routings: dict[str, dict], out: Path) -> Path:
    """Paper Figs. 12-13: per layer and expert, the share of the expert's tokens that are image
    tokens (0: text only, 1: image only), from validation batches of each MoE arch."""
    fig, axes = subplots(1, len(routings), figsize=(5.2 * len(routings), 3.6), squeeze=False,
                             layout="constrained")  # fmt: skip
    im = None
    for ax, (arch, r) in zip(axes[0], routings.items(), strict=True):
        rows = []
        for layer in r["layers"]:
            img = np.asarray(layer["image"]) * layer["image_tokens"]
            txt = np.asarray(layer["text"]) * layer["text_tokens"]
            with np.errstate(invalid="ignore"):
                rows.append(img / (img + txt))
        share = np.array(rows)
        im = ax.imshow(share, vmin=0, vmax=1, cmap="coolwarm", aspect="auto")
        for (i, j), v in np.ndenumerate(share):
            if np.isfinite(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6)
        ax.set(xlabel="expert", ylabel="layer", xticks=range(share.shape[1]),
               yticks=range(share.shape[0]))  # fmt: skip
        ax.set_title(f"{arch} ({r['size']}): image share per expert", fontsize=9)
    fig.colorbar(im, ax=axes[0].tolist(), label="image tokens / tokens routed")
    return save(fig, out / "moe_routing.png")


def loss_curves(points: Path, runs: pd.DataFrame, archs: list[str], curves: Path, out: Path):
    """Training loss vs tokens of the largest-budget point of every (arch, size); one panel per
    arch. Also writes each curve as CSV into ``curves`` (what ``dvc plots show`` renders)."""
    sizes = list(dict.fromkeys(runs.sort_values("N")["size"]))
    fig, axes = subplots(1, len(archs), figsize=(3.6 * len(archs), 3.4), squeeze=False)
    for ax, arch in zip(axes[0], archs, strict=True):
        r = runs[runs.arch == arch]
        for i, size in enumerate(sizes):
            top = r[r["size"] == size].sort_values("D")
            if top.empty:
                continue
            path = points / top.point_id.iloc[-1] / "metrics.jsonl"
            if not path.exists():
                continue
            m = pd.DataFrame([json.loads(x) for x in path.read_text().splitlines()])
            m = m.dropna(subset=["train_loss"])[["step", "tokens", "train_loss"]]
            m["smoothed"] = m.train_loss.ewm(alpha=0.2).mean()
            m.to_csv(curves / f"{slug(arch)}_{slug(size)}.csv", index=False)
            ax.plot(m.tokens, m.smoothed, color=f"C{i}", lw=1.2, label=size)
        ax.set(xscale="log", yscale="log", xlabel="tokens", ylabel="train loss (EMA)")
        ax.set_title(arch, fontsize=9)
        plain_log_y(ax)
        ax.legend(fontsize=7)
    return save(fig, out / "loss_curves.png")


def emergence_by_rank(runs: pd.DataFrame, out: Path, arch: str | None = None) -> Path | None:
    """Loss on name and value tokens per entity-rank decade against tokens seen, for the
    smallest and largest size of one arch (the synthetic world's ``eval_*_rank1e*`` columns):
    frequent entities are learned first, rarer ones as D (and N) grow. None without them."""
    decades = sorted(
        {int(c.rsplit("1e", 1)[1]) for c in runs.columns if c.startswith("eval_value_rank1e")}
    )
    if not decades:
        return None
    arch = arch or str(runs.arch.iloc[0])
    r = runs[runs.arch == arch]
    by_n = sorted(r["size"].unique(), key=lambda s: r[r["size"] == s].N.iloc[0])
    sizes = [by_n[0], by_n[-1]] if len(by_n) > 1 else by_n
    fig, axes = subplots(1, 2, figsize=(10, 3.8))
    for ax, role in zip(axes, ("name", "value"), strict=True):
        for d in decades:
            col = f"eval_{role}_rank1e{d}"
            if col not in r:
                continue
            label = "rank 1" if d == 0 else f"ranks {10 ** (d - 1) + 1:,}–{10**d:,}"
            for size, ls in zip(sizes, ("-", "--"), strict=False):
                s = r[r["size"] == size].sort_values("D")
                ax.plot(s.D, s[col], ls=ls, marker="o", ms=3, color=f"C{d}",
                        label=label if size == sizes[0] else None)  # fmt: skip
        for size, ls in zip(sizes, ("-", "--"), strict=False):
            ax.plot([], [], ls=ls, color="gray", label=f"size {size}")
        ax.set(xscale="log", yscale="log", xlabel="tokens seen D", ylabel=f"loss on {role} tokens")
        ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_title(f"{arch}: {role} tokens by entity-rank decade", fontsize=9)
        ax.legend(fontsize=6, ncol=2)
    return save(fig, out / "emergence_by_rank.png")


def mixture_exponents(fits: dict, out: Path) -> Path | None:
    """Paper Table 3 as a figure: a and b of the paper's form (avg loss) against each mixture's
    caption share, per base arch; None unless the fits have several mixtures."""
    from stages.reporting.document import paper_form

    pts: dict[str, list[tuple[float, float, float]]] = {}
    for key, f in fits.items():
        m = f.get("mixture")
        share = ((m or {}).get("shares") or {}).get("caption")
        if not key.endswith("/avg") or share is None:
            continue
        pf = paper_form(f)
        pts.setdefault(m["base_arch"], []).append((share, pf.get("a"), pf.get("b")))
    if not pts:
        return None
    fig, ax = subplots(figsize=(5.4, 3.8))
    for i, (arch, rows) in enumerate(sorted(pts.items())):
        rows.sort()
        x = [r[0] for r in rows]
        ax.plot(x, [r[1] for r in rows], "o-", color=f"C{i}", label=f"{arch}: a (N_opt)")
        ax.plot(x, [r[2] for r in rows], "s--", color=f"C{i}", label=f"{arch}: b (D_opt)")
    ax.set(xlabel="caption share of the mixture", ylabel="exponent")
    ax.set_title("compute-optimal exponents per mixture (paper Table 3)", fontsize=9)
    ax.legend(fontsize=7)
    return save(fig, out / "mixture_exponents.png")
