"""The paper's qualitative findings, each judged on this run's runs and fits.

Each :class:`Finding` gets one verdict of a fixed vocabulary (:data:`VERDICTS`), from rules fixed
before any result is read (:func:`judge`), with the numbers behind it and the reason:

- **reproduced**: the effect's 95% interval lies on the claimed side of zero and no law family's
  fitted frontier shows the opposite effect;
- **contradicted**: the interval lies on the other side *and* the opposite effect holds on the
  fitted frontier of every law family *and* in every seed (so a study of one seed never
  contradicts a claim, nor does a claim judged on fits that pool the seeds);
- **not reproduced at this scale**: the interval lies on the other side, but the opposite effect
  does not hold across law families and seeds (the reason says which);
- **inconclusive**: the interval contains zero, or the matched runs and the fitted frontiers
  disagree; with how many more runs would decide it if the mean effect held;
- **not testable here**: the study lacks what the claim needs (the reason names it).

Matched comparisons pair runs of two archs at the same size, token budget, mixture and seed; the
frontier effects compare the archs' compute-optimal losses L*(C) under the same law family for
both, at compute budgets both fits span (stages/scaling/families.py), one number per family: the
spread over families is part of the uncertainty.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import yaml

from stages.common.paths import ROOT
from stages.scaling.law import fitted_law, law_from_entry

log = logging.getLogger(__name__)

MATCH = ["size", "tokens_budget", "mixture", "seed"]
VERDICTS = ("reproduced", "not reproduced at this scale", "contradicted", "inconclusive",
            "not testable here")  # fmt: skip


@dataclass
class Finding:
    claim: str
    source: str
    verdict: str  # one of VERDICTS
    evidence: str
    effect: float | None = None  # the measured effect (see ``unit``), NaN-free
    low: float | None = None  # its 95% interval
    high: float | None = None
    unit: str = ""
    decide: str = ""  # for an inconclusive finding: how much more data would decide it
    reason: str = ""  # why this verdict, by the rules of :func:`judge`
    frontier: dict[str, float] = field(default_factory=dict)  # effect per law family's frontier
    seeds: dict[str, float] = field(default_factory=dict)  # mean matched effect per seed


BOOT = 2000  # resamples of the matched runs


def _plural(names: list[str], one: str, many: str, verb: tuple[str, str] = ("", "")) -> str:
    """``one name`` or ``many a, b``, then the verb in the number that agrees."""
    if len(names) == 1:
        return f"{one} {names[0]}{verb[0]}"
    return f"{many} {', '.join(names)}{verb[1]}"


def judge(
    effect: float,
    low: float | None,
    high: float | None,
    claimed: int,
    frontier: dict[str, float] | None = None,
    seeds: dict[str, float] | int = 1,
) -> tuple[str, str, str]:
    """(verdict, reason, decide) of a claim whose effect has the sign ``claimed`` (-1 or +1),
    from its 95% interval [low, high], the effect on each law family's fitted ``frontier`` and
    the effect per seed (``seeds``; or, for a claim judged on fits that pool the seeds, the
    number of seeds: such a claim is never contradicted, as no effect per seed is measured). The
    module docstring states the rules."""
    fam = {k: v for k, v in (frontier or {}).items() if v is not None and math.isfinite(v)}
    if low is None or high is None or not (math.isfinite(low) and math.isfinite(high)):
        return "inconclusive", "no interval could be computed", ""
    if claimed * low > 0 and claimed * high > 0:
        against = [f for f, v in fam.items() if claimed * v < 0]
        if against:
            return ("inconclusive", "the interval lies on the claimed side, but "
                    + _plural(against, "the frontier of the law family", "the frontiers of the law "
                              "families", (" shows", " show")) + " the opposite effect", "")  # fmt: skip
        why = "the interval lies on the claimed side of zero"
        why += (
            " and every law family's frontier agrees" if fam else " (no fitted frontier to compare)"
        )
        return "reproduced", why, ""
    if claimed * low < 0 and claimed * high < 0:
        short = []
        if not fam:
            short.append("no law family's frontier could be compared")
        else:
            agree = [f for f, v in fam.items() if claimed * v >= 0]
            if agree:
                short.append(_plural(agree, "the frontier of the law family", "the frontiers of "
                                     "the law families", (" does", " do")) + " not show it")  # fmt: skip
        if isinstance(seeds, int):
            short.append("judged on fits that pool the seeds: whether it holds in every seed is "
                         "not measured" if seeds > 1 else "one seed: whether it holds across "
                         "seeds is not measured")  # fmt: skip
        elif len(seeds) < 2:
            short.append("one seed: whether it holds across seeds is not measured")
        else:
            agree = [str(s) for s, v in seeds.items() if claimed * v >= 0]
            if agree:
                short.append(_plural(agree, "seed", "seeds", (" does", " do")) + " not show it")
        if short:
            return ("not reproduced at this scale", "the interval lies on the opposite side of "
                    "zero, but " + "; ".join(short), "")  # fmt: skip
        return ("contradicted", "the opposite effect holds in the interval, on every law "
                "family's frontier and in every seed", "")  # fmt: skip
    half = (high - low) / 2
    if effect == 0 or not math.isfinite(effect):
        return ("inconclusive", "the interval contains zero",
                "no effect measured: more runs would only narrow the interval")  # fmt: skip
    k = (half / abs(effect)) ** 2
    side = "for" if effect * claimed > 0 else "against"
    return ("inconclusive", "the interval contains zero",
            f"~{k:.1f}x the matched runs (seeds) would decide it {side} the claim, if the mean "
            "effect held")  # fmt: skip


def family_laws(fits: dict, key: str) -> dict:
    """Every law family's non-degenerate law of the fit ``key`` (fits.json ``families``)."""
    out = {}
    for name, fam in ((fits.get(key) or {}).get("families") or {}).items():
        law = law_from_entry({**fam, "law": name})
        if law is not None and not law.degenerate:
            out[name] = law
    return out


def shared_budgets(entries: list[dict], where: str = "all") -> np.ndarray:
    """Compute budgets every fit of ``entries`` spans: three log-spaced over the shared range
    (``all``), or its lower end (``low``: the smallest models' compute); the middle of the union
    when the ranges do not overlap."""
    lo = max(e["C_min"] for e in entries)
    hi = min(e["C_max"] for e in entries)
    if lo >= hi:
        lo = hi = math.sqrt(min(e["C_min"] for e in entries) * max(e["C_max"] for e in entries))
    return np.array([lo]) if where == "low" else np.geomspace(lo, hi, 3)


def frontier_loss(law, C: np.ndarray, ratio: float, n_range: tuple[float, float],
                  d_range: tuple[float, float]) -> np.ndarray:  # fmt: skip
    """The law's lowest loss at each compute ``C`` (= 6 ``ratio`` N D) over the allocations inside
    the trained sizes ``n_range`` and budgets ``d_range``: its compute-optimal loss where the
    optimum lies among them, the best loss at their edge otherwise (never extrapolated); NaN
    where no trained N and D give C."""
    C = np.asarray(C, float)[None, :]
    Ns = np.geomspace(n_range[0], n_range[1], 256)[:, None]
    D = C / (6.0 * ratio * Ns)
    lo, hi = d_range[0] * (1 - 1e-9), d_range[1] * (1 + 1e-9)
    inside = (lo <= D) & (hi >= D)
    with np.errstate(all="ignore"):
        L = np.where(inside, law.loss(Ns, D), np.nan)
    L = np.where(np.isfinite(L), L, np.inf).min(axis=0)
    return np.where(np.isfinite(L), L, np.nan)


def frontier_effects(fits: dict, runs: pd.DataFrame, a: str, others: list[str],
                     target: str = "avg", where: str = "all") -> dict[str, float]:  # fmt: skip
    """Per law family fitted to every arch: the mean over shared budgets of L*_a(C) / L*_rival(C)
    - 1, L* the family's lowest loss at C over the arch's trained sizes (:func:`frontier_loss`);
    the rival is the one of ``others`` or, with several, the worse of them."""
    keys = [f"{x}/{target}" for x in (a, *others)]
    if not all(k in fits for k in keys):
        return {}
    laws = [family_laws(fits, k) for k in keys]
    trained = [runs[runs.arch == x] for x in (a, *others)]
    ranges = [((r.N.min(), r.N.max()), (r.D.min(), r.D.max())) for r in trained]
    Cs = shared_budgets([fits[k] for k in keys], where)
    out = {}
    for name in laws[0]:
        if not all(name in lw for lw in laws):
            continue
        L = [frontier_loss(lw[name], Cs, fits[k]["compute_ratio"], *rg)
             for lw, k, rg in zip(laws, keys, ranges, strict=True)]  # fmt: skip
        with np.errstate(all="ignore"):
            eff = float(np.nanmean(L[0] / np.max(L[1:], axis=0) - 1))
        if math.isfinite(eff):
            out[name] = eff
    return out


def _fmt_frontier(fam: dict[str, float], pct: bool = True, label: str | None = None) -> str:
    if not fam:
        return "no law family's frontier to compare"
    f = (lambda v: f"{v:+.2%}") if pct else (lambda v: f"{v:+.3f}")
    vals = list(fam.values())
    label = label or ("on the fitted frontiers (the same law family for each arch; its best loss "
                      "at a compute over the sizes and budgets trained)")  # fmt: skip
    return (f"{label}: " + ", ".join(f"{k} {f(v)}" for k, v in fam.items())
            + f"; range [{f(min(vals))}, {f(max(vals))}]")  # fmt: skip


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


def study_with(archs: list[str]) -> str | None:
    """The repository's study file (studies/*.yaml, by name) whose grid trains every one of
    ``archs``, or None."""
    for path in sorted((ROOT / "studies").glob("*.yaml")):
        try:
            trained = (yaml.safe_load(path.read_text()).get("grid") or {}).get("archs") or []
        except (OSError, yaml.YAMLError, AttributeError):
            continue
        if set(archs) <= set(trained):
            return f"studies/{path.name}"
    return None


def _missing(runs: pd.DataFrame, archs: list[str]) -> str | None:
    names = [x for x in archs if x not in set(runs.arch)]
    if not names:
        return None
    preset = study_with(names)
    where = (f"{preset} trains them (docs/study.md)" if preset
             else f"a study whose grid.archs include {', '.join(names)} tests it")  # fmt: skip
    return f"the study trained no {' or '.join(names)} runs; {where}"


def _per_seed(m: pd.DataFrame, rel: np.ndarray) -> dict[str, float]:
    return {
        str(k): float(v) for k, v in pd.Series(rel, index=m.index).groupby(m["seed"]).mean().items()
    }


def _compare(runs, fits, a, b, claim, source, target="avg", subset=None, where="all") -> Finding:
    """Claim: ``a`` has a lower loss than ``b``. Effect: the mean relative difference
    (a - b) / b over matched runs, its interval by a bootstrap over them; beside it the same on
    each law family's fitted frontier (``where``: all shared budgets, or the lowest)."""
    missing = _missing(runs, [a, b])
    if missing:
        return Finding(claim, source, "not testable here", missing, reason=missing)
    m = matched(runs, a, b, target)
    if subset is not None:
        m = subset(m)
    if len(m) < 2:
        why = f"{len(m)} matched {a}/{b} runs (need 2)"
        return Finding(claim, source, "not testable here", why, reason=why)
    la, lb = m[f"loss_{target}_{a}"].to_numpy(), m[f"loss_{target}_{b}"].to_numpy()
    rel = (la - lb) / lb
    effect, low, high = _pair_interval(rel, seed=len(m))
    fam = frontier_effects(fits, runs, a, [b], target, where)
    seeds = _per_seed(m, rel)
    verdict, reason, decide = judge(effect, low, high, -1, fam, seeds)
    wins = int((la < lb).sum())
    at = " at the lowest shared compute" if where == "low" else ""
    evidence = (f"{a} lower {target} loss than {b} in {wins}/{len(m)} matched runs (same size, "
                f"tokens, seed); mean {a} − {b} = {float((la - lb).mean()):+.4f} nats; "
                f"{_fmt_frontier(fam)}{at if fam else ''}")  # fmt: skip
    if len(seeds) > 1:
        evidence += "; per seed " + ", ".join(f"{k}: {v:+.2%}" for k, v in seeds.items())
    return Finding(claim, source, verdict, evidence, effect, low, high, f"({a} − {b}) / {b}",
                   decide, reason, fam, seeds)  # fmt: skip


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


LOSSLESS = 0.01
"""A codebook that loses less than this share of the looks' information (bits an image shows of
an entity) cannot test "discrete does worst": codes and pixels then carry nearly the same
information. A convention set in the change that first measured the default world's loss
(0.33%), not fixed before it; the report says so."""


def findings(runs: pd.DataFrame, fits: dict, codebook: dict | None = None) -> list[Finding]:
    out = []
    moe, aware = moe_name(runs, "early-moe"), moe_name(runs, "early-moe-aware")
    smallest = lambda m: m[m["N"] == m["N"].min()]  # noqa: E731
    out.append(_compare(runs, fits, "early", "late", "Early fusion is at least as good as late "
                        "fusion for small models", "paper Sec. 3.1, Fig. 2", subset=smallest,
                        where="low"))  # fmt: skip
    out.append(late_needs_more_parameters(runs, fits))
    out.append(_compare(runs, fits, moe, "early", "MoE beats dense at equal active parameters",
                        "paper Sec. 4, Fig. 9"))  # fmt: skip
    out.append(_compare(runs, fits, moe, aware, "Learned (modality-agnostic) "
                        "routing beats modality-aware hard routing", "paper Sec. 4, Fig. 11"))  # fmt: skip
    out.append(discrete_worst(runs, fits, codebook))
    return out


def late_needs_more_parameters(runs: pd.DataFrame, fits: dict) -> Finding:
    """Effect: log10 of late's over early's compute-optimal N at the middle of the compute
    range (each fit's chosen law), its interval from the two fits' bootstraps (normal); beside
    it the same ratio with one law family for both, per family."""
    claim, source = "Late fusion needs more parameters at the compute optimum", "paper Sec. 3.2"
    missing = _missing(runs, ["early", "late"])
    fe, fl = fits.get("early/avg"), fits.get("late/avg")
    if missing or not (fe and fl):
        why = missing or "needs the fits of early/avg and late/avg"
        return Finding(claim, source, "not testable here", why, reason=why)
    le, ll = fitted_law(fe), fitted_law(fl)
    if le is None or ll is None:
        why = "a fit is degenerate (an exponent <= 0)"
        return Finding(claim, source, "inconclusive", why, reason=why)
    C = shared_budgets([fe, fl])[1:2]
    ne = le.optimum(C, fe["compute_ratio"])[0][0]
    nl = ll.optimum(C, fl["compute_ratio"])[0][0]
    effect = math.log10(nl / ne)
    fam = {}
    laws_e, laws_l = family_laws(fits, "early/avg"), family_laws(fits, "late/avg")
    for name in laws_e:
        if name in laws_l:
            with np.errstate(all="ignore"):
                r = math.log10(laws_l[name].optimum(C, fl["compute_ratio"])[0][0]
                               / laws_e[name].optimum(C, fe["compute_ratio"])[0][0])  # fmt: skip
            if math.isfinite(r):
                fam[name] = r
    forced = [n for n in fam if n == "shared"]
    evidence = (f"at C = {C[0]:.3g} FLOPs the fitted N_opt is {nl:.3g} (late, {fl.get('law')} "
                f"law) vs {ne:.3g} (early, {fe.get('law')} law), ratio {nl / ne:.2f}; a = "
                f"{fl['a']:.3f} (late) vs {fe['a']:.3f} (early); log10 ratio "
                + _fmt_frontier(fam, False, "per law family (the same for both archs)")
                + ("; the shared family forces a = 0.5 for both" if forced else ""))  # fmt: skip
    sd = [f.get("bootstrap", {}).get("log10_N_opt_mid", {}).get("std") for f in (fe, fl)]
    n_seeds = int(runs.seed.nunique()) if "seed" in runs else 1
    outside = [f"{x} {n:.3g} (trained {r.N.min():,}–{r.N.max():,})"
               for x, n in (("early", ne), ("late", nl))
               for r in [runs[runs.arch == x]]
               if not r.N.min() * (1 - 1e-9) <= n <= r.N.max() * (1 + 1e-9)]  # fmt: skip
    if outside:
        why = ("the compute-optimal N lies outside the sizes trained, so the allocation is "
               "extrapolated, not measured: " + "; ".join(outside))  # fmt: skip
        low = high = None
        if not any(x is None or not math.isfinite(x) for x in sd):
            half = 1.96 * math.sqrt(sd[0] ** 2 + sd[1] ** 2)
            low, high = effect - half, effect + half
        return Finding(claim, source, "not testable here", evidence, effect, low, high,
                       "log10 N_opt late / early", reason=why, frontier=fam)  # fmt: skip
    if any(x is None or not math.isfinite(x) for x in sd):
        why = "no bootstrap interval"
        return Finding(claim, source, "inconclusive", evidence + "; " + why, effect, None, None,
                       "log10 N_opt late / early", reason=why, frontier=fam)  # fmt: skip
    half = 1.96 * math.sqrt(sd[0] ** 2 + sd[1] ** 2)
    verdict, reason, decide = judge(effect, effect - half, effect + half, +1, fam, n_seeds)
    return Finding(claim, source, verdict, evidence, effect, effect - half, effect + half,
                   "log10 N_opt late / early", decide.replace("matched runs", "runs"), reason,
                   fam)  # fmt: skip


def discrete_worst(runs: pd.DataFrame, fits: dict, codebook: dict | None = None) -> Finding:
    """Effect: the mean relative gap of discrete's avg loss over the worse of early and late at
    matched runs (> 0: discrete is the worst), its interval by a bootstrap over them; beside it
    the same gap on each law family's frontiers. ``codebook``: the codebook stage's measure of
    the information its codes lose (``information`` of data/codebook/report.json): below
    :data:`LOSSLESS` the claim is not testable here."""
    claim = "Discrete visual tokens do worst (vs early and late fusion on continuous patches)"
    source = "this pipeline's question (not in the paper, which has no discrete variant)"
    others = [a for a in ("early", "late") if a in set(runs.arch)]
    missing = _missing(runs, ["discrete"] + ([] if others else ["early"]))
    if missing:
        return Finding(claim, source, "not testable here", missing, reason=missing)
    parts, gaps, seeds = [], None, {}
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
            g = (losses["discrete"] - rival) / rival
            gaps = g.to_numpy()
            seeds = {str(k): float(v) for k, v in g.groupby(level="seed").mean().items()}
    if gaps is None or len(gaps) < 2:
        why = "; ".join(parts) + " (need 2 matched runs)"
        return Finding(claim, source, "not testable here", why, reason=why)
    effect, low, high = _pair_interval(gaps, seed=len(gaps))
    fam = frontier_effects(fits, runs, "discrete", others)
    verdict, reason, decide = judge(effect, low, high, +1, fam, seeds)
    parts.append(_fmt_frontier(fam))
    share = (codebook or {}).get("share_lost")
    if share is not None:
        lost = (f"the codebook loses {share:.2%} of what the images show of an entity "
                f"({codebook['bits_lost']:.3g} of {codebook['bits_per_look']:.3g} bits)")  # fmt: skip
        parts.append(lost)
        if share < LOSSLESS:
            verdict, decide = "not testable here", ""
            reason = (f"{lost}, under the {LOSSLESS:.0%} the claim needs: codes and pixels "
                      "carry the same information here")  # fmt: skip
    return Finding(claim, source, verdict, "; ".join(parts), effect, low, high,
                   f"(discrete − worse of {'/'.join(others)}) / it, avg", decide, reason, fam,
                   seeds)  # fmt: skip
