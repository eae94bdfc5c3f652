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
    verdict: str  # reproduced | contradicted | inconclusive | not tested
    evidence: str
    effect: float | None = None  # the measured effect (see ``unit``), NaN-free
    low: float | None = None  # its 95% interval
    high: float | None = None
    unit: str = ""
    decide: str = ""  # for an inconclusive finding: how much more data would decide it


BOOT = 2000  # resamples of the matched runs


def judge(effect: float, low: float, high: float, claimed: int) -> tuple[str, str]:
    """The verdict of a claim whose effect has the sign ``claimed`` (-1 or +1), from its 95%
    interval: reproduced if the interval lies on the claimed side of 0, contradicted if on the
    other, else inconclusive, with the factor of more matched runs that would shrink the
    interval (as 1/sqrt(n)) to exclude 0 if the effect held."""
    if claimed * low > 0 and claimed * high > 0:
        return "reproduced", ""
    if claimed * low < 0 and claimed * high < 0:
        return "contradicted", ""
    half = (high - low) / 2
    if effect == 0 or not math.isfinite(effect):
        return "inconclusive", "no effect measured: more runs would only narrow the interval"
    k = (half / abs(effect)) ** 2
    side = "for" if effect * claimed > 0 else "against"
    return (
        "inconclusive",
        f"~{k:.1f}x the matched runs (seeds) would decide it {side} the claim, if the mean effect held",
    )


def _pair_interval(values: np.ndarray, seed: int) -> tuple[float, float, float]:
    """Mean and 95% percentile interval of the mean, by a bootstrap over the matched runs."""
    rng = np.random.default_rng(seed)
    means = rng.choice(values, size=(BOOT, len(values)), replace=True).mean(1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(values.mean()), float(low), float(high)


def matched(runs: pd.DataFrame, a: str, b: str, target: str = "avg") -> pd.DataFrame:
    """Runs of arch a and b at the same size, budget, mixture and seed, side by side."""
    col = f"loss_{target}"
    x = runs[runs.arch == a][[*MATCH, "N", "C", col]]
    y = runs[runs.arch == b][[*MATCH, "C", col]]
    return x.merge(y, on=MATCH, suffixes=(f"_{a}", f"_{b}"))


def _compare(runs, a, b, claim, source, target="avg", subset=None) -> Finding:
    """Claim: ``a`` has a lower loss than ``b``. Effect: the mean relative difference
    (a - b) / b over matched runs, its interval by a bootstrap over them."""
    missing = [x for x in (a, b) if x not in set(runs.arch)]
    if missing:
        return Finding(claim, source, "not tested", f"no {' or '.join(missing)} runs in this study")
    m = matched(runs, a, b, target)
    if subset is not None:
        m = subset(m)
    if len(m) < 2:
        return Finding(claim, source, "not tested", f"{len(m)} matched {a}/{b} runs (need 2)")
    la, lb = m[f"loss_{target}_{a}"].to_numpy(), m[f"loss_{target}_{b}"].to_numpy()
    rel = (la - lb) / lb
    effect, low, high = _pair_interval(rel, seed=len(m))
    verdict, decide = judge(effect, low, high, claimed=-1)
    wins = int((la < lb).sum())
    return Finding(claim, source, verdict,
                   f"{a} lower {target} loss than {b} in {wins}/{len(m)} matched runs (same size, "
                   f"tokens, seed); mean {a} − {b} = {float((la - lb).mean()):+.4f} nats",
                   effect, low, high, f"({a} − {b}) / {b}", decide)  # fmt: skip


def moe_name(runs: pd.DataFrame, arch: str) -> str:
    """The runs' name of MoE arch ``arch``: itself, or with a sweep of expert counts (archs
    ``<arch>-e<n>``) the paper's 8 experts if swept, else the most experts."""
    names = set(runs.arch)
    if arch in names or "moe_arch" not in runs.columns:
        return arch
    swept = runs[runs.moe_arch == arch]
    counts = sorted({int(n) for n in swept.n_experts.dropna()})
    if not counts:
        return arch
    return f"{arch}-e{8 if 8 in counts else counts[-1]}"


def findings(runs: pd.DataFrame, fits: dict) -> list[Finding]:
    out = []
    moe, aware = moe_name(runs, "early-moe"), moe_name(runs, "early-moe-aware")
    smallest = lambda m: m[m["N"] == m["N"].min()]  # noqa: E731
    out.append(_compare(runs, "early", "late", "Early fusion is at least as good as late fusion "
                        "for small models", "paper Sec. 3.1, Fig. 2", subset=smallest))  # fmt: skip
    out.append(late_needs_more_parameters(fits))
    out.append(_compare(runs, moe, "early", "MoE beats dense at equal active parameters",
                        "paper Sec. 4, Fig. 9"))  # fmt: skip
    out.append(_compare(runs, moe, aware, "Learned (modality-agnostic) "
                        "routing beats modality-aware hard routing", "paper Sec. 4, Fig. 11"))  # fmt: skip
    out.append(discrete_worst(runs))
    return out


def late_needs_more_parameters(fits: dict) -> Finding:
    """Effect: log10 of late's over early's compute-optimal N at the middle of the compute
    range (each fit's chosen law), its interval from the two fits' bootstraps (normal)."""
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
    effect = math.log10(nl / ne)
    sd = [f.get("bootstrap", {}).get("log10_N_opt_mid", {}).get("std") for f in (fe, fl)]
    evidence = (f"at C = {C:.3g} FLOPs the fitted N_opt is {nl:.3g} (late, {fl.get('law')} law) "
                f"vs {ne:.3g} (early, {fe.get('law')} law), ratio {nl / ne:.2f}; a = "
                f"{fl['a']:.3f} (late) vs {fe['a']:.3f} (early)")  # fmt: skip
    if any(x is None or not math.isfinite(x) for x in sd):
        return Finding(claim, source, "inconclusive", evidence + "; no bootstrap interval",
                       effect, None, None, "log10 N_opt late / early")  # fmt: skip
    half = 1.96 * math.sqrt(sd[0] ** 2 + sd[1] ** 2)
    verdict, decide = judge(effect, effect - half, effect + half, claimed=+1)
    return Finding(claim, source, verdict, evidence, effect, effect - half, effect + half,
                   "log10 N_opt late / early", decide.replace("matched runs", "runs"))  # fmt: skip


def discrete_worst(runs: pd.DataFrame) -> Finding:
    """Effect: the mean relative gap of discrete's avg loss over the worse of early and late at
    matched runs (> 0: discrete is the worst), its interval by a bootstrap over them."""
    claim = "Discrete visual tokens do worst (vs early and late fusion on continuous patches)"
    source = "this pipeline's question (not in the paper, which has no discrete variant)"
    others = [a for a in ("early", "late") if a in set(runs.arch)]
    if "discrete" not in set(runs.arch) or not others:
        return Finding(claim, source, "not tested", "needs discrete and early or late runs")
    parts, gaps = [], None
    for target in ("avg", "caption"):
        losses = (
            runs[runs.arch.isin(["discrete", *others])]
            .pivot_table(index=MATCH, columns="arch", values=f"loss_{target}")
            .dropna()
        )
        rival = losses[others].max(axis=1)
        worst = int((losses.idxmax(axis=1) == "discrete").sum())
        parts.append(f"{target}: discrete has the highest loss in {worst}/{len(losses)} matched "
                     f"runs (mean gap to the worse of {'/'.join(others)} "
                     f"{(losses['discrete'] - rival).mean():+.4f})")  # fmt: skip
        if target == "avg":
            gaps = ((losses["discrete"] - rival) / rival).to_numpy()
    if gaps is None or len(gaps) < 2:
        return Finding(claim, source, "not tested", "; ".join(parts))
    effect, low, high = _pair_interval(gaps, seed=len(gaps))
    verdict, decide = judge(effect, low, high, claimed=+1)
    return Finding(claim, source, verdict, "; ".join(parts), effect, low, high,
                   f"(discrete − worse of {'/'.join(others)}) / it, avg", decide)  # fmt: skip
