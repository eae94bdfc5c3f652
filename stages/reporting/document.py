"""The report as a document: results/report.md from a Jinja2 template, and its HTML rendering.

The markdown's layout is templates/report.md.j2; this module turns this run's findings, fits
and figures into the template's rows of strings, and holds the one set of constants the report
prints that were not computed here: the paper's Table 2. :func:`to_html` renders the markdown
(python-markdown, tables extension) as one standalone page with every figure inlined, so it can
be mailed or opened anywhere.
"""

from __future__ import annotations

import base64
import math
import re
from pathlib import Path
from typing import Any

import pandas as pd
from jinja2 import Environment, FileSystemLoader, StrictUndefined

from stages.common.figures import slug
from stages.reporting.findings import Finding
from stages.reporting.predictions import coverage_table
from stages.scaling.law import below_floor, fitted_law

PARAMS = ("E", "alpha", "beta", "a", "b", "c", "d")
# Shukor et al. 2025, Table 2: (E, alpha, beta, a, b, c, d) per (arch, target).
PAPER_TABLE2 = {
    ("early", "text"): (2.222, 0.3084, 0.3375, 0.5246, 0.4774, -0.0420, 0.9085),
    ("early", "caption"): (1.569, 0.3111, 0.3386, 0.5203, 0.4785, -0.0610, 0.9187),
    ("early", "interleaved"): (1.966, 0.2971, 0.338, 0.5315, 0.4680, -0.0459, 0.8791),
    ("early", "avg"): (1.904, 0.301, 0.335, 0.5262, 0.473, -0.0492, 0.8987),
    ("late", "avg"): (1.891, 0.2903, 0.3383, 0.6358, 0.4619, -0.0494, 0.6732),
    ("early-moe", "avg"): (2.158, 0.710, 0.372, 0.361, 0.656, -0.047, 1.797),
}
# Shukor et al. 2025, Table 3 (early fusion, avg loss): mixture -> (E, a, b)
PAPER_TABLE3 = {
    "45-45-10": (1.906, 0.527, 0.474),
    "40-20-40": (1.965, 0.518, 0.486),
    "30-30-40": (1.847, 0.572, 0.428),
    "20-40-40": (1.836, 0.582, 0.423),
}
TEMPLATES = Path(__file__).parent / "templates"


def _num(v, fmt=".4g") -> str:
    return "–" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, fmt)


def _with_ci(fit: dict, k: str) -> str:
    """A fitted value with its bootstrap interval; a parameter the law family fixes says so (no
    zero-width interval); an interval whose resamples never left one basin is marked."""
    boot = fit.get("bootstrap") or {}
    ci = boot.get(k)
    s = _num(fit.get(k))
    if ci and "fixed" in ci:
        return f"{s} (fixed: {ci['fixed']})"
    if ci and ci.get("low") is not None and ci.get("high") is not None:
        s += f" [{_num(ci['low'], '.3g')}, {_num(ci['high'], '.3g')}]"
        if (boot.get("basins") or {}).get("one_basin"):
            s += " (one basin)"
    return s


def _effect(f: Finding) -> str:
    if f.effect is None:
        return "–"
    ci = f" [{f.low:+.3g}, {f.high:+.3g}]" if f.low is not None else ""
    return f"{f.effect:+.3g}{ci} {f.unit}"


def paper_form(entry: dict) -> dict:
    """A fits.json entry as the paper's form fitted it (its ``families.paper``), whichever law
    the fit chose; the frontier exponent c is the data's."""
    fam = (entry.get("families") or {}).get("paper")
    return {**entry, **fam, "law": "paper"} if fam else entry


def paper_table(fits: dict, floor: dict[str, float] | None = None) -> dict[str, Any]:
    """Our E..d (the paper's form, with intervals) beside the paper's, per row of its Table 2;
    an E below the corpus's ``floor`` of its target is marked."""
    rows = []
    for (arch, target), paper in PAPER_TABLE2.items():
        f = fits.get(f"{arch}/{target}")
        ours = [_with_ci(paper_form(f), k) for k in PARAMS] if f else ["not run"] * len(PARAMS)
        if f and below_floor(paper_form(f).get("E"), (floor or {}).get(target)):
            ours[0] += " (below the floor)"
        rows.append([f"{arch}/{target}", "this study", *ours])
        rows.append(["", "paper", *(f"{v:g}" for v in paper)])
    return {"header": ["fit", "source", *PARAMS], "rows": rows}


def chosen_laws(fits: dict, archs: list[str]) -> str:
    """Each arch's chosen law family for the avg loss, e.g. "early: shared, late: floor"."""
    return ", ".join(f"{a}: {fits[f'{a}/avg'].get('law', 'paper')}" for a in archs
                     if f"{a}/avg" in fits) or "no avg fits"  # fmt: skip


def fits_table(fits: dict, floor: dict[str, float]) -> dict[str, Any]:
    """Every fit (its chosen law), with the corpus's entropy floor beside its E."""
    rows = []
    for key, f in sorted(fits.items()):
        target = key.split("/")[-1]
        flag = "" if fitted_law(f) is not None else " (degenerate)"
        E, fl = f.get("E"), floor.get(target)
        below = " (below the floor: E not identified)" if below_floor(E, fl) else ""
        row = [key + flag, f.get("law", "paper"), _with_ci(f, "E") + below, _num(fl, ".3f")]
        row += [_num(f.get(k)) for k in PARAMS[1:]]
        row += [_num(f.get("fit_r2"), ".3f"), _num(f.get("heldout_mre"), ".2%")]
        rows.append(row)
    header = ["fit", "law", "E [95% CI]", "floor", *PARAMS[1:], "R²", "held-out MRE"]
    return {"header": header, "rows": rows}


def mixtures_table(fits: dict) -> dict[str, Any] | None:
    """E, a, b of the paper's form per mixture (avg loss), by caption share, beside the paper's
    Table 3 where a mixture has its name; None unless the grid had several mixtures."""
    rows = []
    entries = [f for k, f in fits.items() if k.endswith("/avg") and f.get("mixture")]
    for f in sorted(entries, key=lambda f: (f["mixture"]["base_arch"],
                                           (f["mixture"].get("shares") or {}).get("caption", 0))):  # fmt: skip
        m, pf = f["mixture"], paper_form(f)
        share = (m.get("shares") or {}).get("caption")
        paper = PAPER_TABLE3.get(m["name"]) if m["base_arch"] == "early" else None
        rows.append([m["base_arch"], m["name"], _num(share, ".2f"),
                     *(_with_ci(pf, k) for k in ("E", "a", "b")),
                     " / ".join(f"{v:g}" for v in paper) if paper else "–"])  # fmt: skip
    if not rows:
        return None
    return {"header": ["arch", "mixture", "caption share", "E", "a", "b", "paper E / a / b"],
            "rows": rows}  # fmt: skip


def sparsity_table(sparse: dict) -> dict[str, Any] | None:
    """The sparsity-aware MoE law per MoE arch (avg loss): its exponents, how well it
    predicts, and what the most experts buy over the fewest; None without a sweep of experts."""
    rows = []
    for key, f in sorted(sparse.items()):
        if not key.endswith("/avg"):
            continue
        boot = (f.get("bootstrap") or {}).get("more_experts_rel") or {}
        ci = (f" [{boot['low']:+.1%}, {boot['high']:+.1%}]"
              if boot.get("low") is not None else "")  # fmt: skip
        rows.append([key.split("/")[0], ", ".join(str(n) for n in f["n_experts"]),
                     str(f["n_points"]),
                     " / ".join(_num(f.get(k), ".3g") for k in ("alpha", "beta", "gamma")),
                     " / ".join(_num(f.get(k), ".3g") for k in ("lambda", "delta")),
                     _num(f.get("fit_mre"), ".2%"), _num(f.get("heldout_mre"), ".2%"),
                     _num(f.get("loso_experts_mre"), ".2%"),
                     f"{f['more_experts_rel']:+.2%}{ci}"])  # fmt: skip
    if not rows:
        return None
    header = ["arch", "experts", "runs", "α / β / γ", "λ / δ", "fit error", "held-out error",
              "leave-one-count-out error", "most vs fewest experts"]  # fmt: skip
    return {"header": header, "rows": rows}


def image_use_table(runs: pd.DataFrame, value: dict[str, float]) -> dict[str, Any] | None:
    """What each arch's largest run gets from the images: its loss with every image blanked
    minus its loss with them, per image kind, beside what the images are worth (the corpus's
    floor without them minus with them): the share of the images' information it uses."""
    kinds = [k for k in ("caption", "interleaved") if f"eval_{k}_noimage" in runs and k in value]
    if not kinds:
        return None
    rows = []
    for arch, r in runs.groupby("arch", sort=False):
        top = r.sort_values(["N", "D"]).iloc[-1]
        cells = []
        for k in kinds:
            used = top[f"eval_{k}_noimage"] - top[f"loss_{k}"]
            cells.append(f"{used:.3f} of {value[k]:.3f} ({used / value[k]:.0%})")
        rows.append([str(arch), f"{top['size']}, D {int(top['D']):,}", *cells])
    return {"header": ["arch", "run", *(f"{k}: nats used of the image's value" for k in kinds)],
            "rows": rows}  # fmt: skip


def families_table(fits: dict) -> dict[str, Any] | None:
    """Each law family's out-of-sample error per fit (top-compute hold-out / leave-one-size-out
    relative error), the chosen one in bold, marked ✗ when it predicts the runs it did not see
    worse than a mean loss does (fits.json ``extrapolates``)."""
    names = list(dict.fromkeys(n for f in fits.values() for n in f.get("families") or {}))
    if not names:
        return None
    rows = []
    for key, f in sorted(fits.items()):
        cells = []
        for n in names:
            fam = (f.get("families") or {}).get(n)
            if fam is None:
                cells.append("–")
                continue
            cell = f"{_num(fam.get('heldout_mre'), '.2%')} / {_num(fam.get('loso_mre'), '.2%')}"
            if n == f.get("law"):
                cell = f"**{cell}**" + (" ✗" if f.get("extrapolates") is False else "")
            cells.append(cell)
        rows.append([key, *cells])
    return {"header": ["fit", *names], "rows": rows}


def equal_compute_rows(eq: pd.DataFrame) -> dict[str, Any] | None:
    """Frontier loss per (kind, C) and arch, the best in bold."""
    if eq.empty:
        return None
    t = eq.pivot_table(index=["target", "C"], columns="arch", values="loss").reset_index()
    archs = [c for c in t.columns if c not in ("target", "C")]
    rows = []
    for _, r in t.iterrows():
        best = min(r[a] for a in archs if pd.notna(r[a]))
        cells = [(f"**{r[a]:.4f}**" if r[a] == best else f"{r[a]:.4f}") if pd.notna(r[a]) else "–"
                 for a in archs]  # fmt: skip
        rows.append([str(r.target), f"{r.C:.3g}", *cells])
    return {"header": ["kind", "C", *archs], "rows": rows}


def scope(runs: pd.DataFrame) -> str:
    """The study's scope in a sentence: its data, sizes, budgets and seeds."""
    synthetic = any(c.startswith("eval_value_rank") for c in runs.columns)
    data = ("a synthetic long-tail world (docs/long-tail-world.md)" if synthetic
            else "the data this study ingested")  # fmt: skip
    seeds = int(runs.seed.nunique()) if "seed" in runs else 1
    return (f"This study trained {len(runs)} points on {data}: N {runs.N.min():,}–{runs.N.max():,} "
            f"parameters, D {runs.D.min():,}–{runs.D.max():,} tokens, "
            f"{seeds} seed{'s' if seeds != 1 else ''}.")  # fmt: skip


def render_markdown(
    results: Path,
    runs: pd.DataFrame,
    fits: dict,
    floor: dict[str, float],
    found: list[Finding],
    figures: dict[str, Path],
    why: dict[str, str],
    eq: pd.DataFrame,
    image_value: dict[str, float] | None = None,
    health: dict[str, Any] | None = None,
    sparse: dict | None = None,
    codebook: dict | None = None,
) -> str:
    """results/report.md (templates/report.md.j2) from this run's inputs and figures."""
    archs = list(dict.fromkeys(runs.arch))
    env = Environment(
        loader=FileSystemLoader(TEMPLATES),
        undefined=StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,  # markdown, not HTML: to_html escapes nothing it did not write
    )
    isoflop = [
        (a, f"plots/isoflop_{slug(a)}_avg.png")
        for a in archs
        if (results / "plots" / f"isoflop_{slug(a)}_avg.png").exists()
    ]
    return env.get_template("report.md.j2").render(
        scope=scope(runs),
        n_runs=len(runs),
        archs=archs,
        sizes=list(dict.fromkeys(runs.sort_values("N")["size"])),
        N_range=f"{runs.N.min():,}–{runs.N.max():,}",
        D_range=f"{runs.D.min():,}–{runs.D.max():,}",
        C_range=f"{runs.C.min():.3g}–{runs.C.max():.3g}",
        findings=[
            [
                f.claim,
                f.source,
                f"**{f.verdict}**",
                _effect(f),
                f.reason + (f" ({f.decide})" if f.decide else ""),
                f.evidence,
            ]
            for f in found
        ],
        figures={k: Path(p).relative_to(results).as_posix() for k, p in figures.items()},
        why=why,
        equal_compute=equal_compute_rows(eq),
        isoflop=isoflop,
        paper=paper_table(fits, floor),
        chosen=chosen_laws(fits, archs),
        fits_table=fits_table(fits, floor),
        families=families_table(fits),
        mixtures=mixtures_table(fits),
        sparsity=sparsity_table(sparse or {}),
        image_use=image_use_table(runs, image_value or {}),
        health=health,
        coverage=coverage_table(fits, runs),
        codebook=codebook or {},
    )


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
