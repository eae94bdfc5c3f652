"""The paper's qualitative findings, each judged on this run's runs and fits.

Each :class:`Finding` is *reproduced*, *not reproduced*, *inconclusive* or *not tested*, with
the numbers behind the verdict. Matched comparisons pair runs of two archs at the same size,
token budget, mixture and seed; a claim is reproduced when it holds in most matched pairs and
on average.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from stages.scaling.law import fitted_law

log = logging.getLogger(__name__)

MATCH = ["size", "tokens_budget", "mixture", "seed"]


@dataclass
class Finding:
    claim: str
    source: str
    verdict: str  # reproduced | not reproduced | not tested | inconclusive
    evidence: str


def matched(runs: pd.DataFrame, a: str, b: str, target: str = "avg") -> pd.DataFrame:
    """Runs of arch a and b at the same size, budget, mixture and seed, side by side."""
    col = f"loss_{target}"
    x = runs[runs.arch == a][[*MATCH, "N", "C", col]]
    y = runs[runs.arch == b][[*MATCH, "C", col]]
    return x.merge(y, on=MATCH, suffixes=(f"_{a}", f"_{b}"))


def _compare(runs, a, b, claim, source, target="avg", subset=None) -> Finding:
    """Claim: ``a`` has the lower loss than ``b`` at matched points (reproduced if in most)."""
    missing = [x for x in (a, b) if x not in set(runs.arch)]
    if missing:
        return Finding(claim, source, "not tested", f"no {' or '.join(missing)} runs in this study")
    m = matched(runs, a, b, target)
    if subset is not None:
        m = subset(m)
    if m.empty:
        return Finding(claim, source, "not tested", f"no matched {a}/{b} runs")
    la, lb = m[f"loss_{target}_{a}"], m[f"loss_{target}_{b}"]
    wins, delta = int((la < lb).sum()), float((la - lb).mean())
    rel = float(((la - lb) / lb).mean())
    verdict = "reproduced" if wins > len(m) / 2 and delta < 0 else "not reproduced"
    return Finding(claim, source, verdict,
                   f"{a} lower {target} loss than {b} in {wins}/{len(m)} matched runs (same size, "
                   f"tokens); mean {a} − {b} = {delta:+.4f} nats ({rel:+.1%})")  # fmt: skip


def findings(runs: pd.DataFrame, fits: dict) -> list[Finding]:
    out = []
    smallest = lambda m: m[m["N"] == m["N"].min()]  # noqa: E731
    out.append(_compare(runs, "early", "late", "Early fusion is at least as good as late fusion "
                        "for small models", "paper Sec. 3.1, Fig. 2", subset=smallest))  # fmt: skip
    out.append(late_needs_more_parameters(fits))
    out.append(_compare(runs, "early-moe", "early", "MoE beats dense at equal active parameters",
                        "paper Sec. 4, Fig. 9"))  # fmt: skip
    out.append(_compare(runs, "early-moe", "early-moe-aware", "Learned (modality-agnostic) "
                        "routing beats modality-aware hard routing", "paper Sec. 4, Fig. 11"))  # fmt: skip
    out.append(discrete_worst(runs))
    return out


def late_needs_more_parameters(fits: dict) -> Finding:
    claim, source = "Late fusion needs more parameters at the compute optimum", "paper Sec. 3.2"
    fe, fl = fits.get("early/avg"), fits.get("late/avg")
    if not (fe and fl):
        return Finding(claim, source, "not tested", "needs the fits of early/avg and late/avg")
    le, ll = fitted_law(fe), fitted_law(fl)
    if le is None or ll is None:
        return Finding(claim, source, "inconclusive", "a fit is degenerate (an exponent <= 0)")
    C = math.sqrt(max(fe["C_min"], fl["C_min"]) * min(fe["C_max"], fl["C_max"]))
    ne = le.optimum(np.array([C]), fe["compute_ratio"])[0][0]
    nl = ll.optimum(np.array([C]), fl["compute_ratio"])[0][0]
    verdict = "reproduced" if nl > ne else "not reproduced"
    return Finding(claim, source, verdict,
                   f"at C = {C:.3g} FLOPs the fitted N_opt is {nl:.3g} (late) vs {ne:.3g} (early), "
                   f"ratio {nl / ne:.2f}; a = {fl['a']:.3f} (late) vs {fe['a']:.3f} (early)")  # fmt: skip


def discrete_worst(runs: pd.DataFrame) -> Finding:
    claim = "Discrete visual tokens do worst (vs early and late fusion on continuous patches)"
    source = "the project brief (not in the paper, which has no discrete variant)"
    others = [a for a in ("early", "late") if a in set(runs.arch)]
    if "discrete" not in set(runs.arch) or not others:
        return Finding(claim, source, "not tested", "needs discrete and early or late runs")
    parts, worst_all = [], True
    for target in ("avg", "caption"):
        losses = (
            runs[runs.arch.isin(["discrete", *others])]
            .pivot_table(index=MATCH, columns="arch", values=f"loss_{target}")
            .dropna()
        )
        worst = int((losses.idxmax(axis=1) == "discrete").sum())
        parts.append(f"{target}: discrete has the highest loss in {worst}/{len(losses)} matched "
                     f"runs (mean gap to the best of {'/'.join(others)} "
                     f"{(losses['discrete'] - losses[others].min(axis=1)).mean():+.4f})")  # fmt: skip
        worst_all &= worst > len(losses) / 2
    return Finding(claim, source, "reproduced" if worst_all else "not reproduced", "; ".join(parts))
