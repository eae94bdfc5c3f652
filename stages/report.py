"""Stage ``report``: the study's answer, ``results/report.md`` and an HTML rendering of it.

From this run's table of runs (results/runs.parquet), fits (results/fits.json, the fit stage's
figures and their data) and points (results/points: loss curves, MoE routing), it writes:

- figures (results/report/figures): loss vs training FLOPs per arch with its fitted frontier
  (paper Fig. 2); the archs at equal compute per data kind; N_opt(C), D_opt(C) per arch beside
  the fit stage's iso-FLOP figures (Fig. 3); predicted vs observed with the held-out runs
  (Table 10); the MoE experts' image/text share per layer (Figs. 12-13); training curves;
- a table of the fitted E, alpha, beta, a, b, c, d with bootstrap intervals beside the paper's
  Table 2, every fit with the synthetic corpus's entropy floor beside its E;
- the paper's qualitative findings (and the brief's claim about discrete tokens), each marked
  reproduced / not reproduced / not tested on this study, with the numbers behind the verdict.

The HTML (results/report.html) has the figures inline, so it can be mailed or opened anywhere.
``python -m stages.report [--results results] [--shards data/shards]``
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from stages import report_figures as figs
from stages.common import fresh_dir, setup_logging
from stages.fit_plots import slug
from stages.params import KINDS

log = logging.getLogger(__name__)

PARAMS = ("E", "alpha", "beta", "a", "b", "c", "d")
# Shukor et al. 2025, Table 2 (and PAPER.md): (E, alpha, beta, a, b, c, d) per row.
PAPER_TABLE2 = {
    ("early", "text"): (2.222, 0.3084, 0.3375, 0.5246, 0.4774, -0.0420, 0.9085),
    ("early", "caption"): (1.569, 0.3111, 0.3386, 0.5203, 0.4785, -0.0610, 0.9187),
    ("early", "interleaved"): (1.966, 0.2971, 0.338, 0.5315, 0.4680, -0.0459, 0.8791),
    ("early", "avg"): (1.904, 0.301, 0.335, 0.5262, 0.473, -0.0492, 0.8987),
    ("late", "avg"): (1.891, 0.2903, 0.3383, 0.6358, 0.4619, -0.0494, 0.6732),
    ("early-moe", "avg"): (2.158, 0.710, 0.372, 0.361, 0.656, -0.047, 1.797),
}
MATCH = ["size", "tokens_budget", "mixture", "seed"]


class ReportError(ValueError):
    """An input of the report is missing or unusable; the message names it."""


@dataclass
class Finding:
    claim: str
    source: str
    verdict: str  # reproduced | not reproduced | not tested | inconclusive
    evidence: str


# ------------------------------------------------------------------------- inputs


def load_inputs(results: Path) -> tuple[pd.DataFrame, dict]:
    runs_path, fits_path = results / "runs.parquet", results / "fits.json"
    for p in (runs_path, fits_path):
        if not p.exists():
            raise ReportError(f"{p} not found: run the grid and fit stages first (dvc repro)")
    runs = pd.read_parquet(runs_path)
    runs = runs[runs.status == "ok"].copy()
    if runs.empty:
        raise ReportError(f"{runs_path} has no run with status ok")
    return runs, json.loads(fits_path.read_text())


def entropy_floor(shards: Path) -> dict[str, float]:
    """Nats per text token no model can beat, per kind (val split) and their mean (``avg``)."""
    info = shards / "info.json"
    if not info.exists():
        return {}
    totals = json.loads(info.read_text()).get("totals", {})
    out = {
        k: totals[f"val/{k}"]["floor_nats_per_token"]
        for k in KINDS
        if totals.get(f"val/{k}", {}).get("floor_nats_per_token") is not None
    }
    if len(out) == len(KINDS):
        out["avg"] = sum(out.values()) / len(out)
    return out


def routings(points: Path, runs: pd.DataFrame) -> dict[str, dict]:
    """Per MoE arch, the routing of its largest model at its largest budget (flows/train.py)."""
    out = {}
    for arch, r in runs[runs.moe.astype(bool)].groupby("arch", sort=False):
        top = r.sort_values(["N", "D"]).iloc[-1]
        path = points / top.point_id / "routing.json"
        if path.exists():
            out[str(arch)] = json.loads(path.read_text())
        else:
            log.warning("%s: no routing.json for point %s (trained before it was recorded)",
                        arch, top.point_id)  # fmt: skip
    return out


# ------------------------------------------------------------------------- analysis


def equal_compute_table(fits: dict, archs: list[str], n: int = 3) -> pd.DataFrame:
    """Loss on each arch's fitted frontier L = c_coef C^c at ``n`` shared compute budgets."""
    rows = []
    for target in figs.TARGETS:
        fs = {a: fits[f"{a}/{target}"] for a in archs if f"{a}/{target}" in fits}
        fs = {a: f for a, f in fs.items() if f.get("c") is not None}
        if not fs:
            continue
        lo = max(f["C_min"] for f in fs.values())
        hi = min(f["C_max"] for f in fs.values())
        if lo >= hi:  # no shared range: the middle of the union
            lo = hi = math.sqrt(
                min(f["C_min"] for f in fs.values()) * max(f["C_max"] for f in fs.values())
            )
        for C in np.geomspace(lo, hi, n):
            for a, f in fs.items():
                rows.append({"target": target, "C": float(C), "arch": a,
                             "loss": f["c_coef"] * C ** f["c"]})  # fmt: skip
    return pd.DataFrame(rows, columns=["target", "C", "arch", "loss"])


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
    if not (figs.nondegenerate(fe) and figs.nondegenerate(fl)):
        return Finding(claim, source, "inconclusive", "a fit is degenerate (an exponent <= 0)")
    C = math.sqrt(max(fe["C_min"], fl["C_min"]) * min(fe["C_max"], fl["C_max"]))
    ne = figs.law_of(fe).optimum(np.array([C]), fe["compute_ratio"])[0][0]
    nl = figs.law_of(fl).optimum(np.array([C]), fl["compute_ratio"])[0][0]
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


# ------------------------------------------------------------------------- markdown


def _num(v, fmt=".4g") -> str:
    return "–" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, fmt)


def _with_ci(fit: dict, k: str) -> str:
    ci = fit.get("bootstrap", {}).get(k)
    s = _num(fit.get(k))
    if ci and ci.get("low") is not None and ci.get("high") is not None:
        s += f" [{_num(ci['low'], '.3g')}, {_num(ci['high'], '.3g')}]"
    return s


def paper_table(fits: dict) -> list[str]:
    head = "| fit | source | " + " | ".join(PARAMS) + " |"
    lines = [head, "|" + "---|" * (len(PARAMS) + 2)]
    for (arch, target), paper in PAPER_TABLE2.items():
        f = fits.get(f"{arch}/{target}")
        ours = (
            " | ".join(_with_ci(f, k) for k in PARAMS)
            if f
            else " | ".join("not run" for _ in PARAMS)
        )
        lines.append(f"| {arch}/{target} | this study | {ours} |")
        lines.append("| | paper | " + " | ".join(f"{v:g}" for v in paper) + " |")
    return lines


def fits_table(fits: dict, floor: dict[str, float]) -> list[str]:
    cols = ["fit", "E [95% CI]", "floor", *PARAMS[1:], "R²", "held-out MRE"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for key, f in sorted(fits.items()):
        target = key.split("/")[-1]
        flag = "" if figs.nondegenerate(f) else " (degenerate)"
        E, fl = f.get("E"), floor.get(target)
        below = " (below the floor: E not identified)" if E is not None and fl and fl > E else ""
        row = [key + flag, _with_ci(f, "E") + below, _num(fl, ".3f")]
        row += [_num(f.get(k)) for k in PARAMS[1:]]
        row += [_num(f.get("fit_r2"), ".3f"), _num(f.get("heldout_mre"), ".2%")]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def write_markdown(results: Path, runs, fits, floor, found, figures, eq) -> str:
    archs = list(dict.fromkeys(runs.arch))
    rel = lambda p: Path(p).relative_to(results).as_posix()  # noqa: E731
    img = lambda name, alt: (  # noqa: E731
        f"![{alt}]({rel(figures[name])})"
        if name in figures
        else f"*({alt}: not drawn: {figures.get('why_' + name, 'no data')})*"
    )  # noqa: E731
    n_ok = len(runs)
    L = [
        "# Native multimodal scaling study: the answer",
        "",
        f"{n_ok} trained points: archs {', '.join(archs)}; sizes "
        f"{', '.join(dict.fromkeys(runs.sort_values('N')['size']))} (N {runs.N.min():,}–{runs.N.max():,}); "
        f"tokens D {runs.D.min():,}–{runs.D.max():,}; compute C {runs.C.min():.3g}–{runs.C.max():.3g} FLOPs. "
        "Everything below is computed from this run's `results/runs.parquet` and "
        "`results/fits.json`; only the paper's columns are constants (Shukor et al. 2025, Table 2).",
        "",
        "## Findings",
        "",
        "| claim | source | verdict | evidence |",
        "|---|---|---|---|",
        *[f"| {f.claim} | {f.source} | **{f.verdict}** | {f.evidence} |" for f in found],
        "",
        "## Loss vs training compute",
        "",
        "Validation loss of every run against its training FLOPs, with each arch's loss-compute "
        "frontier L ∝ C^c (lower convex hull, paper Fig. 2).",
        "",
        img("loss_vs_compute", "loss vs compute"),
        "",
        "## The architectures at equal compute",
        "",
        "Loss on each arch's fitted frontier at the same compute budgets, per data kind.",
        "",
        img("equal_compute", "equal compute"),
        "",
        *_eq_table(eq),
        "",
        "## Compute-optimal allocation",
        "",
        "N_opt(C) and D_opt(C) of each fitted law (avg loss), and the fit stage's iso-FLOP curves "
        "with N_opt marked.",
        "",
        img("optimal_allocation", "N_opt and D_opt vs C"),
        "",
        *[
            f"![iso-FLOP {a}](plots/isoflop_{slug(a)}_avg.png)"
            for a in archs
            if (results / "plots" / f"isoflop_{slug(a)}_avg.png").exists()
        ],
        "",
        "## Predicted vs observed",
        "",
        "Each arch's law refitted without its highest-compute runs, predicting them (stars).",
        "",
        img("predicted_vs_observed", "predicted vs observed"),
        "",
        "## MoE: which experts see image and text tokens",
        "",
        img("moe_routing", "MoE routing"),
        "",
        "## Fitted laws beside the paper (Table 2)",
        "",
        "Ours with 95% bootstrap intervals. At laptop scale (N ≤ 1e6, D ≤ 1e5) the exponents "
        "describe early training, not the paper's regime; compare signs and orderings, not values.",
        "",
        *paper_table(fits),
        "",
        "## Every fit, with the corpus's entropy floor beside E",
        "",
        "The floor is the exact conditional entropy of the synthetic text (nats per text token, "
        "stages/synthetic.py): E should not fall below it.",
        "",
        *fits_table(fits, floor),
        "",
        "## Training curves",
        "",
        img("loss_curves", "training curves"),
        "",
    ]
    return "\n".join(L)


def _eq_table(eq: pd.DataFrame) -> list[str]:
    if eq.empty:
        return []
    t = eq.pivot_table(index=["target", "C"], columns="arch", values="loss").reset_index()
    archs = [c for c in t.columns if c not in ("target", "C")]
    lines = ["| kind | C | " + " | ".join(archs) + " |", "|" + "---|" * (len(archs) + 2)]
    for _, r in t.iterrows():
        best = min(r[a] for a in archs if pd.notna(r[a]))
        cells = [(f"**{r[a]:.4f}**" if r[a] == best else f"{r[a]:.4f}") if pd.notna(r[a]) else "–"
                 for a in archs]  # fmt: skip
        lines.append(f"| {r.target} | {r.C:.3g} | " + " | ".join(cells) + " |")
    return lines


def to_html(md: str, base: Path) -> str:
    """The markdown as a standalone HTML page, every image inlined as a data URI."""
    import markdown

    body = markdown.markdown(md, extensions=["tables"])

    def inline(m: re.Match) -> str:
        path = base / m.group(1)
        if not path.exists():
            return m.group(0)
        data = base64.b64encode(path.read_bytes()).decode()
        return f'src="data:image/png;base64,{data}"'

    body = re.sub(r'src="([^"]+\.png)"', inline, body)
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;line-height:1.4}"
             "table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #ccc;"
             "padding:3px 6px}img{max-width:100%}")  # fmt: skip
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>Scaling study report"
            f"</title><style>{style}</style></head><body>{body}</body></html>\n")  # fmt: skip


# ------------------------------------------------------------------------- the stage


def run_report(results: str | Path = "results", shards: str | Path = "data/shards") -> Path:
    results, shards = Path(results), Path(shards)
    runs, fits = load_inputs(results)
    archs = list(dict.fromkeys(runs.arch))
    out = fresh_dir(results / "report")
    fig_dir, curves = out / "figures", out / "curves"
    fig_dir.mkdir()
    curves.mkdir()
    floor = entropy_floor(shards)
    eq = equal_compute_table(fits, archs)
    figures: dict[str, Path | str] = {
        "loss_vs_compute": figs.loss_vs_compute(runs, fits, archs, fig_dir),
        "optimal_allocation": figs.optimal_allocation(fits, archs, fig_dir),
        "predicted_vs_observed": figs.predicted_vs_observed(results / "plot_data", archs, fig_dir),
        "loss_curves": figs.loss_curves(results / "points", runs, archs, curves, fig_dir),
    }
    if not eq.empty:
        figures["equal_compute"] = figs.equal_compute(eq, fig_dir)
    routing = routings(results / "points", runs)
    if routing:
        figures["moe_routing"] = figs.moe_routing(routing, fig_dir)
    else:
        figures["why_moe_routing"] = "no MoE arch with a routing record in this study"
    found = findings(runs, fits)
    md = write_markdown(results, runs, fits, floor, found, figures, eq)
    (results / "report.md").write_text(md)
    (results / "report.html").write_text(to_html(md, results))
    (out / "findings.json").write_text(json.dumps([f.__dict__ for f in found], indent=1))
    for f in found:
        log.info("%s: %s (%s)", f.verdict.upper(), f.claim, f.evidence)
    log.info("wrote %s and %s", results / "report.md", results / "report.html")
    return results / "report.md"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--results", default="results", help="the grid's and fit's outputs")
    ap.add_argument("--shards", default="data/shards", help="for the entropy floor (info.json)")
    args = ap.parse_args(argv)
    setup_logging()
    try:
        run_report(args.results, args.shards)
    except ReportError as e:
        log.error("%s", e)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
