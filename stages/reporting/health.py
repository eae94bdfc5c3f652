"""Is the grid past the optimisation transient, and do its laws hold? (the report's checks)

A power law describes a grid only where every model has left the transient: the loss falls
with N at fixed D and with D at fixed N, and each doubling of D gains less than the one before
(a decelerating curve; an accelerating one is still in the optimiser's warm-up regime). And a
fit is worth extrapolating only where it predicts runs it did not see. :func:`transient` counts
the first per arch from the runs; :func:`law_checks` gathers the second per fit. Both go to the
report and to ``results/report/health.json``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from stages.common.inputs import InputError

FALLING_MIN = 0.95  # share of adjacent pairs in which the loss falls (N or D one step up)
DECELERATING_MIN = 0.90  # share of consecutive budget triples whose gain shrinks
R2_MIN, HELDOUT_MAX, EXPONENTS = 0.98, 0.02, (0.1, 1.0)


def transient(runs: pd.DataFrame, loss: str = "loss_avg") -> dict[str, Any]:
    """Per arch: adjacent (size or budget) pairs in which ``loss`` falls, consecutive budget
    triples at each size whose gain per step shrinks, and the pairs and triples that fail, each
    with its margin (``fail_margins``: kind ``N`` or ``D``, a pair one size or one budget up, and
    its relative rise; kind ``triple``, its gain's growth over its middle loss; what
    :func:`bench_noise` weighs against a noise measured elsewhere)."""
    per_arch, fails, margins = {}, [], []
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
                    margins.append(("N", (l1 - l0) / l0))
        for N, row in t.iterrows():  # D one step up at fixed N
            row = row.dropna()
            vals = list(row.items())
            for (d0, l0), (d1, l1) in zip(vals, vals[1:], strict=False):
                c["d_pairs"] += 1
                c["d_falling"] += l1 < l0
                if not l1 < l0:
                    fails.append(f"{arch}: {size[N]} at D {d0:,}→{d1:,} ({l0:.4f}→{l1:.4f})")
                    margins.append(("D", (l1 - l0) / l0))
            for (_, l0), (_, l1), (d2, l2) in zip(vals, vals[1:], vals[2:], strict=False):
                c["triples"] += 1
                c["dec"] += (l1 - l2) < (l0 - l1)
                if not (l1 - l2) < (l0 - l1):
                    fails.append(f"{arch}: {size[N]} gains {l0 - l1:.4f} then {l1 - l2:.4f} "
                                 f"up to D {d2:,} (accelerating)")  # fmt: skip
                    margins.append(("triple", ((l1 - l2) - (l0 - l1)) / l1))
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
        "fail_margins": [{"kind": k, "margin": float(v)} for k, v in margins],
    }


def _steps(
    ok: pd.DataFrame, by: list[str], loss: str
) -> tuple[list[tuple[str, np.ndarray]], list[np.ndarray]]:
    """Every step between adjacent points of ``ok`` (grouped by ``by``): its axis (``N``, one
    size up at a budget; ``D``, one budget up at a size) and its relative drop at each seed;
    and every consecutive budget triple's gain change at each seed (> 0: the gain shrinks)."""
    steps: list[tuple[str, np.ndarray]] = []
    triples: list[np.ndarray] = []
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
                if axis == "D":
                    for i0, i1, i2 in zip(sub.index, sub.index[1:], sub.index[2:], strict=False):
                        l0, l1, l2 = sub.loc[i0], sub.loc[i1], sub.loc[i2]
                        change = (((l0 - l1) - (l1 - l2)) / l1).dropna().to_numpy()
                        if change.size:
                            triples.append(change)
    return steps, triples


def _medians(steps: list[tuple[str, np.ndarray]]) -> dict[str, float | None]:
    """The median step (averaged over seeds) one size up and one budget up."""
    out = {}
    for key, axis in (("size_step", "N"), ("budget_step", "D")):
        m = [float(d.mean()) for a, d in steps if a == axis]
        out[key] = float(np.median(m)) if m else None
    return out


def seed_noise(runs: pd.DataFrame, loss: str = "loss_avg", z: float = 2.0) -> dict[str, Any]:
    """Run-to-run noise, measured where points were trained at two or more seeds.

    ``run_sd``: the pooled relative standard deviation of one run's ``loss`` about its point's
    seed mean (arch, size, budget, mixture). What the grid must resolve is a step between
    adjacent points (one size up at fixed D, one budget up at fixed N), and the runs of one seed
    are not independent across points (the same data order for every size, one trunk for every
    budget), so steps are taken seed by seed: ``size_step_sd`` and ``budget_step_sd`` are the
    pooled relative standard deviations across seeds of a step one size up and one budget up
    (budget steps share a trunk, so they vary less; ``step_sd`` pools both), ``size_step`` and
    ``budget_step`` the median step (the relative drop, averaged over seeds), and of the steps
    whose mean does not fall (``not_falling``), ``within_noise`` are within ``z`` standard
    errors (of their axis) of zero (noise-sized, not necessarily the transient). The same for
    consecutive budget triples at a size, whose gain should shrink: ``gain_change_sd`` is the
    pooled standard deviation across seeds of the gain's change, (first gain − second gain) /
    middle loss, and of the triples whose mean accelerates (``accelerating``),
    ``accelerating_within_noise`` are within ``z`` standard errors of no change. ``points`` 0:
    one seed everywhere, nothing measured.
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
    steps, triples = _steps(ok, by, loss)

    def pooled(arrays: list[np.ndarray]) -> float | None:
        paired = [d for d in arrays if d.size >= 2]
        if not paired:
            return None
        ss = sum(float(((d - d.mean()) ** 2).sum()) for d in paired)
        return math.sqrt(ss / sum(d.size - 1 for d in paired))

    def within(arrays: list[np.ndarray], sd: float | None) -> int:
        return sum(sd is not None and -d.mean() <= z * sd / math.sqrt(d.size) for d in arrays)

    step_sd = pooled([d for _, d in steps])
    axis_sd = {a: pooled([d for b, d in steps if b == a]) for a in ("N", "D")}
    gain_sd = pooled(triples)
    fails = {a: [d for b, d in steps if b == a and d.mean() <= 0] for a in ("N", "D")}
    accel = [d for d in triples if d.mean() <= 0]

    return out | {
        "run_sd": sd,
        "step_sd": step_sd,
        "size_step_sd": axis_sd["N"],
        "budget_step_sd": axis_sd["D"],
        **_medians(steps),
        "not_falling": len(fails["N"]) + len(fails["D"]),
        "within_noise": int(sum(within(fails[a], axis_sd[a]) for a in fails)),
        "gain_change_sd": gain_sd,
        "accelerating": len(accel),
        "accelerating_within_noise": int(within(accel, gain_sd)),
        "z": z,
    }


def median_steps(runs: pd.DataFrame, loss: str = "loss_avg") -> dict[str, float | None]:
    """The median relative drop of ``loss`` one size up at fixed budget (``size_step``) and one
    budget up at fixed size (``budget_step``), seed by seed and averaged over seeds, over every
    arch and mixture: what :func:`seed_noise` reports, measured at one seed too."""
    ok = runs[runs.status == "ok"]
    ok = ok.assign(seed=ok.get("seed", 0))
    by = ["arch"] + (["mixture"] if "mixture" in ok else [])
    return _medians(_steps(ok, by, loss)[0])


def read_bench_noise(path: str | Path | None) -> dict[str, Any] | None:
    """The noise file ``bench/isoflop.py`` writes, checked; None when there is none. A file
    that is not one (not JSON, or without its ``noise`` and the ``point_id`` of each of its
    ``runs``) raises InputError naming the file, what is wrong and the fix."""
    if path is None or not Path(path).exists():
        return None
    fix = f"rerun `python bench/isoflop.py` to rewrite it, or remove {path}"
    try:
        m = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path} is not JSON ({e}): {fix}") from None
    if not isinstance(m, dict) or not isinstance(m.get("noise"), dict):
        raise InputError(f"{path} has no 'noise' mapping: not a bench noise file; {fix}")
    runs = m.get("runs")
    if not isinstance(runs, list) or not all(isinstance(r, dict) and "point_id" in r
                                             for r in runs):  # fmt: skip
        raise InputError(f"{path}: 'runs' must list each run with its 'point_id'; {fix}")
    return m


def bench_noise(
    path: str | Path | None, runs: pd.DataFrame, transient_: dict[str, Any], z: float = 2.0
) -> dict[str, Any]:
    """The run-to-run noise a bench measured at two seeds (``path``: the file
    ``bench/isoflop.py`` writes), for a study whose grid has one seed, and whether it belongs to
    this study: ``status`` ``current`` when some of its runs are points of this study (a point's
    id hashes its data, recipe and the code that trained it, so the bench ran this code on these
    data), ``other`` when none is (it is then not used), ``missing`` without the file. When
    current: this study's median size step against the bench's noise of a size step, and how
    many of this study's failed transient checks (``transient_``'s ``fail_margins``) are within
    ``z`` of it (a pair's rise against the noise of a step on its axis, a triple's gain growth
    against ``gain_change_sd``: one run per point, so one standard deviation is its standard
    error). A count is None where the bench measured no such noise."""
    m = read_bench_noise(path)
    if m is None:
        return {"status": "missing", "path": str(path) if path else None}
    ours = set(runs.loc[runs.status == "ok", "point_id"]) if "point_id" in runs else set()
    shared = sorted({r["point_id"] for r in m["runs"]} & ours)
    out = {"path": str(path), "status": "current" if shared else "other", "shared": len(shared),
           "runs": len(m["runs"]), **{k: m.get(k) for k in BENCH_KEYS}}  # fmt: skip
    if not shared:
        return out
    noise = m["noise"]
    steps = median_steps(runs)
    sd = {"N": noise.get("size_step_sd"), "D": noise.get("budget_step_sd"),
          "triple": noise.get("gain_change_sd")}  # fmt: skip
    margins = transient_.get("fail_margins", [])

    def weigh(kinds: tuple[str, ...]) -> tuple[int, int | None]:
        """(failed checks of these kinds, how many are within z of the noise; None: unmeasured)"""
        found = [f for f in margins if f["kind"] in kinds]
        if any(sd[f["kind"]] is None for f in found):
            return len(found), None
        return len(found), sum(f["margin"] <= z * sd[f["kind"]] for f in found)

    not_falling, not_falling_within = weigh(("N", "D"))
    accelerating, accelerating_within = weigh(("triple",))
    size_sd = sd["N"]
    return out | {
        "noise": noise,
        **steps,
        "size_step_over_noise": (
            steps["size_step"] / size_sd if steps["size_step"] is not None and size_sd else None
        ),
        "not_falling": not_falling,
        "not_falling_within_noise": not_falling_within,
        "accelerating": accelerating,
        "accelerating_within_noise": accelerating_within,
        "z": z,
    }


# what a bench's noise file says of itself, shown beside its numbers
BENCH_KEYS = ("bench", "arch", "sizes", "tokens", "seeds", "machine", "git_revision", "measured")


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


def health_tables(
    runs: pd.DataFrame, fits: dict, floor: dict[str, float], noise_file: str | Path | None = None
) -> dict[str, Any]:
    """The report's two tables and the JSON behind them; ``noise_file``: a bench's two-seed
    noise, weighed only when the grid has one seed and the bench ran this study's points."""
    tr = transient(runs)
    noise = seed_noise(runs)
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
        "noise": noise,
        "bench_noise": None if noise["points"] else bench_noise(noise_file, runs, tr),
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
