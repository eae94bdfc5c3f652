"""Is the grid past the optimisation transient, and do its laws hold? (the report's checks)

A power law describes a grid only where every model has left the transient: the loss falls
with N at fixed D and with D at fixed N, and each doubling of D gains less than the one before
(a decelerating curve; an accelerating one is still in the optimiser's warm-up regime). And a
fit is worth extrapolating only where it predicts runs it did not see. :func:`transient` counts
the first per arch from the runs; :func:`law_checks` gathers the second per fit. Both go to the
report and to ``results/report/health.json``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

FALLING_MIN = 0.95  # share of adjacent pairs in which the loss falls (N or D one step up)
DECELERATING_MIN = 0.90  # share of consecutive budget triples whose gain shrinks
R2_MIN, HELDOUT_MAX, EXPONENTS = 0.98, 0.02, (0.1, 1.0)


def transient(runs: pd.DataFrame, loss: str = "loss_avg") -> dict[str, Any]:
    """Per arch: adjacent (size or budget) pairs in which ``loss`` falls, consecutive budget
    triples at each size whose gain per step shrinks, and the pairs and triples that fail."""
    per_arch, fails = {}, []
    tot = dict.fromkeys(("n_pairs", "n_falling", "d_pairs", "d_falling", "triples", "dec"), 0)
    for arch, r in runs[runs.status == "ok"].groupby("arch", sort=False):
        t = r.pivot_table(index="N", columns="tokens_budget", values=loss, aggfunc="mean")
        t = t.sort_index().sort_index(axis=1)
        size = dict(zip(r.N, r["size"], strict=False))
        c = dict.fromkeys(tot, 0)
        for D in t.columns:  # N one step up at fixed D
            col = t[D].dropna()
            for (n0, l0), (n1, l1) in zip(col.items(), list(col.items())[1:], strict=False):
                c["n_pairs"] += 1
                c["n_falling"] += l1 < l0
                if not l1 < l0:
                    fails.append(f"{arch}: {size[n0]}→{size[n1]} at D {D:,} ({l0:.4f}→{l1:.4f})")
        for N, row in t.iterrows():  # D one step up at fixed N
            row = row.dropna()
            vals = list(row.items())
            for (d0, l0), (d1, l1) in zip(vals, vals[1:], strict=False):
                c["d_pairs"] += 1
                c["d_falling"] += l1 < l0
                if not l1 < l0:
                    fails.append(f"{arch}: {size[N]} at D {d0:,}→{d1:,} ({l0:.4f}→{l1:.4f})")
            for (_, l0), (_, l1), (d2, l2) in zip(vals, vals[1:], vals[2:], strict=False):
                c["triples"] += 1
                c["dec"] += (l1 - l2) < (l0 - l1)
                if not (l1 - l2) < (l0 - l1):
                    fails.append(f"{arch}: {size[N]} gains {l0 - l1:.4f} then {l1 - l2:.4f} "
                                 f"up to D {d2:,} (accelerating)")  # fmt: skip
        per_arch[str(arch)] = c
        for k in tot:
            tot[k] += c[k]
    falling = (tot["n_falling"] + tot["d_falling"]) / max(1, tot["n_pairs"] + tot["d_pairs"])
    dec = tot["dec"] / max(1, tot["triples"])
    return {
        "per_arch": per_arch,
        "total": tot,
        "falling_share": falling,
        "decelerating_share": dec,
        "past_transient": falling >= FALLING_MIN and dec >= DECELERATING_MIN,
        "fails": fails,
    }


def seed_noise(runs: pd.DataFrame, loss: str = "loss_avg", z: float = 2.0) -> dict[str, Any]:
    """Run-to-run noise, measured where points were trained at two or more seeds.

    ``run_sd``: the pooled relative standard deviation of one run's ``loss`` about its point's
    seed mean (arch, size, budget, mixture). What the grid must resolve is a step between
    adjacent points (one size up at fixed D, one budget up at fixed N), and the runs of one seed
    are not independent across points (the same data order for every size, one trunk for every
    budget), so steps are taken seed by seed: ``step_sd`` is the pooled relative standard
    deviation of a step across seeds, ``size_step`` and ``budget_step`` the median step (the
    relative drop, averaged over seeds), and of the steps whose mean does not fall
    (``not_falling``), ``within_noise`` are within ``z`` standard errors of zero (noise-sized,
    not necessarily the transient). ``points`` 0: one seed everywhere, nothing measured.
    """
    ok = runs[runs.status == "ok"]
    ok = ok.assign(seed=ok.get("seed", 0))
    by = ["arch"] + (["mixture"] if "mixture" in ok else [])
    g = ok.groupby([*by, "size", "tokens_budget"], sort=False)[loss].agg(["mean", "var", "count"])
    multi = g[g["count"] >= 2]
    out: dict[str, Any] = {
        "points": len(multi),
        "seeds_min": int(multi["count"].min()) if len(multi) else 0,
        "seeds_max": int(multi["count"].max()) if len(multi) else 0,
    }
    if multi.empty:
        return out
    dof = multi["count"] - 1
    sd = math.sqrt(float((dof * multi["var"] / multi["mean"] ** 2).sum() / dof.sum()))
    steps: list[tuple[str, np.ndarray]] = []  # (axis, the relative drop at each seed)
    for _, r in ok.groupby(by, sort=False):
        for axis, index, cols in (("N", "N", "tokens_budget"), ("D", "tokens_budget", "N")):
            t = r.pivot_table(index=index, columns=[cols, "seed"], values=loss, aggfunc="mean")
            t = t.sort_index()
            for c in t.columns.get_level_values(0).unique():
                sub = t[c].dropna(how="all")
                for i0, i1 in zip(sub.index, sub.index[1:], strict=False):
                    drop = ((sub.loc[i0] - sub.loc[i1]) / sub.loc[i0]).dropna().to_numpy()
                    if drop.size:
                        steps.append((axis, drop))
    paired = [d for _, d in steps if d.size >= 2]
    ss = sum(float(((d - d.mean()) ** 2).sum()) for d in paired)
    step_sd = math.sqrt(ss / sum(d.size - 1 for d in paired)) if paired else None
    fails = [d for _, d in steps if d.mean() <= 0]
    within = sum(step_sd is not None and -d.mean() <= z * step_sd / math.sqrt(d.size)
                 for d in fails)  # fmt: skip

    def median(axis: str) -> float | None:
        m = [float(d.mean()) for a, d in steps if a == axis]
        return float(np.median(m)) if m else None

    return out | {
        "run_sd": sd,
        "step_sd": step_sd,
        "size_step": median("N"),
        "budget_step": median("D"),
        "not_falling": len(fails),
        "within_noise": int(within),
        "z": z,
    }


def law_checks(fits: dict, floor: dict[str, float], target: str = "avg") -> list[dict[str, Any]]:
    """Per arch, the chosen law of its ``target`` fit: R², held-out error on L and on L − E,
    its exponents, and E's bootstrap interval against the corpus's floor, each with pass/fail."""
    out = []
    for key, f in sorted(fits.items()):
        arch, _, t = key.rpartition("/")
        if t != target:
            continue
        boot_E = (f.get("bootstrap") or {}).get("E") or {}
        fl = floor.get(target, f.get("floor"))
        e_low = boot_E.get("low", f.get("E"))
        exps = [f.get("alpha"), f.get("beta")]
        row = {
            "arch": arch,
            "law": f.get("law", "paper"),
            "r2": f.get("fit_r2"),
            "heldout_mre": f.get("heldout_mre"),
            "heldout_mre_reducible": f.get("heldout_mre_reducible"),
            "alpha": exps[0],
            "beta": exps[1],
            "E": f.get("E"),
            "E_low": e_low,
            "E_high": boot_E.get("high", f.get("E")),
            "E_fixed": "fixed" in boot_E,  # the floor family's E is the floor: no interval
            "one_basin": bool(((f.get("bootstrap") or {}).get("basins") or {}).get("one_basin")),
            "floor": fl,
            # the paper's form beside it (fitted always): its exponents and extrapolation
            **{f"paper_{k}": ((f.get("families") or {}).get("paper") or {}).get(k)
               for k in ("alpha", "beta", "heldout_mre")},
        }  # fmt: skip
        row["ok_r2"] = _ge(row["r2"], R2_MIN)
        row["ok_heldout"] = _ge(HELDOUT_MAX, row["heldout_mre"])
        row["ok_exponents"] = all(_ge(x, EXPONENTS[0]) and _ge(EXPONENTS[1], x) for x in exps)
        # a floor law has E = floor by construction: no test (no mark)
        row["ok_E"] = None if fl is None or row["law"] == "floor" else bool(_ge(e_low, fl))
        out.append(row)
    return out


def _ge(a: Any, b: Any) -> bool:
    return a is not None and b is not None and np.isfinite([a, b]).all() and a >= b


def health_tables(runs: pd.DataFrame, fits: dict, floor: dict[str, float]) -> dict[str, Any]:
    """The report's two tables and the JSON behind them."""
    tr = transient(runs)
    rows = []
    for arch, c in tr["per_arch"].items():
        rows.append([arch, f"{c['n_falling']}/{c['n_pairs']}", f"{c['d_falling']}/{c['d_pairs']}",
                     f"{c['dec']}/{c['triples']}"])  # fmt: skip
    t = tr["total"]
    rows.append(["**all**", f"{t['n_falling']}/{t['n_pairs']}", f"{t['d_falling']}/{t['d_pairs']}",
                 f"{t['dec']}/{t['triples']}"])  # fmt: skip
    checks = law_checks(fits, floor)

    def mark(ok: bool | None, text: str) -> str:
        return text if ok is None else f"{text} {'✓' if ok else '✗'}"

    law_rows = [
        [r["arch"], r["law"], mark(r["ok_r2"], _fmt(r["r2"], ".3f")),
         mark(r["ok_heldout"], _fmt(r["heldout_mre"], ".2%")),
         _fmt(r["heldout_mre_reducible"], ".2%"),
         mark(r["ok_exponents"], f"{_fmt(r['alpha'], '.3g')} / {_fmt(r['beta'], '.3g')}"),
         mark(r["ok_E"], f"{_fmt(r['E'], '.4f')} (fixed: the floor)" if r["E_fixed"] else
              f"{_fmt(r['E'], '.4f')} [{_fmt(r['E_low'], '.4f')}, {_fmt(r['E_high'], '.4f')}]"
              f"{' (one basin)' if r['one_basin'] else ''} vs {_fmt(r['floor'], '.4f')}"),
         f"{_fmt(r['paper_alpha'], '.3g')} / {_fmt(r['paper_beta'], '.3g')}, "
         f"{_fmt(r['paper_heldout_mre'], '.2%')}"]
        for r in checks
    ]  # fmt: skip
    return {
        "transient": tr,
        "laws": checks,
        "noise": seed_noise(runs),
        "transient_falling_min": FALLING_MIN,
        "transient_dec_min": DECELERATING_MIN,
        "transient_table": {
            "header": [
                "arch",
                "falls with N (pairs)",
                "falls with D (pairs)",
                "gain per doubling of D shrinks (triples)",
            ],
            "rows": rows,
        },  # fmt: skip
        "laws_table": {
            "header": [
                "arch",
                "law",
                f"R² (≥ {R2_MIN})",
                f"held-out error on L (≤ {HELDOUT_MAX:.0%})",
                "on L − E",
                f"α / β (in [{EXPONENTS[0]}, {EXPONENTS[1]}])",
                "E [95% CI] vs the floor",
                "paper's form: α / β, held-out error",
            ],
            "rows": law_rows,
        },  # fmt: skip
    }


def _fmt(v: Any, spec: str) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return format(v, spec)
