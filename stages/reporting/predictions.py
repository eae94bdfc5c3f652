"""The report's check of the fits' prediction intervals: do runs a fit did not see fall inside?

Per arch, pooled over its targets: the share of the top-compute runs inside the interval of the
law refitted without them, and of every run inside the interval of the law refitted without its
model size (fits.json ``coverage``, stages/scaling/fit.py), with a Wilson interval on each share
(runs of one study are not independent draws, so read it as a rough guide); and one prediction
beyond the grid (4x N and 4x D of the largest run) with its interval, to show its width.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from stages.scaling import predictive
from stages.scaling.law import law_from_entry


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a share k/n (95% by default)."""
    if n == 0:
        return math.nan, math.nan
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _inside(cov: dict[str, Any], which: str) -> tuple[int, int]:
    n = int(cov.get(f"{which}_n") or 0)
    share = cov.get(which)
    return (round(share * n), n) if n and share is not None else (0, 0)


def _share(k: int, n: int) -> str:
    if n == 0:
        return "–"
    lo, hi = wilson(k, n)
    return f"{k}/{n} ({k / n:.0%}; {lo:.0%}–{hi:.0%})"


def coverage_table(fits: dict[str, Any], runs: pd.DataFrame) -> dict[str, Any] | None:
    """The report's table (header, rows), the pooled counts and the fits whose resamples stayed in
    one basin; None when no fit has a prediction interval (``fit.bootstrap: 0``)."""
    by_arch: dict[str, list[tuple[str, dict]]] = {}
    for key, f in sorted(fits.items()):
        if f.get("coverage") and f.get("prediction"):
            arch, _, target = key.rpartition("/")
            by_arch.setdefault(arch, []).append((target, f))
    if not by_arch:
        return None
    rows, total, one_basin = [], np.zeros(4, int), []
    level = None
    for arch, entries in by_arch.items():
        counts = np.zeros(4, int)
        for target, f in entries:
            level = f["coverage"].get("level", level)
            counts += [*_inside(f["coverage"], "heldout"), *_inside(f["coverage"], "loso")]
            if f["prediction"].get("one_basin"):
                one_basin.append(f"{arch}/{target}")
        total += counts
        avg = dict(entries).get("avg")
        spans, example = "–", "–"
        if avg is not None:
            spans = f"{avg.get('law')}" + (
                f" (+ {', '.join(avg['prediction']['families'][1:])})"
                if len(avg["prediction"]["families"]) > 1
                else ""
            )
            mine = runs[runs.arch == arch] if "arch" in runs.columns else runs
            if len(mine) and law_from_entry(avg) is not None:
                big = mine.loc[(mine.N * mine.D).idxmax()]
                N, D = 4 * float(big.N), 4 * float(big.D)
                p = predictive.predict(avg, N, D)
                flag = " (one basin)" if p["one_basin"] else ""
                lo, hi = float(p["low"][0]), float(p["high"][0])
                span = f"[{lo:.4f}, {hi:.4f}]" if np.isfinite([lo, hi]).all() else "(no interval)"
                example = f"{float(p['L'][0]):.4f} {span}{flag} at N {N:,.0f}, D {D:,.0f}"
        rows.append([arch, spans, _share(*counts[:2]), _share(*counts[2:]), example])
    rows.append(["**all**", "", _share(*total[:2]), _share(*total[2:]), ""])
    pct = f"{level:.0%}" if level is not None else "95%"
    header = [
        "arch",
        "avg law (+ families the interval spans)",
        f"top-compute runs inside the {pct} interval (all targets)",
        "runs of a left-out size inside (all targets)",
        f"avg predicted at 4× N and 4× D of the largest run [{pct}]",
    ]
    return {
        "header": header,
        "rows": rows,
        "heldout": [int(total[0]), int(total[1])],
        "loso": [int(total[2]), int(total[3])],
        "level": level,
        "one_basin": one_basin,
    }
