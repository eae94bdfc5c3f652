"""Stage ``report``: the study's answer, ``results/report.md`` and an HTML rendering of it.

From this run's table of runs (results/runs.parquet), fits (results/fits.json, the fit stage's
figures and their data) and points (results/points: loss curves, MoE routing), it writes:

- figures (results/report/figures): loss vs training FLOPs per arch with its fitted frontier
  (paper Fig. 2); the archs at equal compute per data kind; N_opt(C), D_opt(C) per arch beside
  the fit stage's iso-FLOP figures (Fig. 3); predicted vs observed with the held-out runs
  (Table 10); the MoE experts' image/text share per layer (Figs. 12-13); training curves; the
  loss on name and value tokens by entity-rank decade against tokens seen (synthetic world);
- a table of the fitted E, alpha, beta, a, b, c, d with bootstrap intervals beside the paper's
  Table 2, every fit with the synthetic corpus's entropy floor beside its E;
- the paper's qualitative findings (and one claim about discrete tokens it does not make), each
  marked reproduced / not reproduced at this scale / contradicted / inconclusive / not testable
  here by rules fixed in stages/reporting/findings.py, with the numbers behind the verdict and
  its reason (results/report/findings.json);
- whether the grid is past the optimisation transient and each arch's law holds out of sample
  (stages/reporting/health.py; results/report/health.json), against the run-to-run noise: the
  grid's own where it has two seeds, else ``--noise`` (bench/isoflop.py's, measured at two
  seeds) when that bench trained points of this study (the same ids: data, recipe and code).

The HTML (results/report.html) has the figures inline, so it can be mailed or opened anywhere.
The library is stages/reporting/ (evidence, findings, figures, the document and its template).
``python -m stages.report [--results results] [--shards data/shards] [--noise FILE]``
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from stages.common.stage import entry_point, fresh_dir
from stages.data.shard_format import text_floors
from stages.reporting import figures as figs
from stages.reporting.document import render_markdown, to_html
from stages.reporting.evidence import (
    equal_compute_table,
    load_inputs,
    load_sparsity,
    routings,
)
from stages.reporting.findings import findings
from stages.reporting.health import health_tables, read_bench_noise

log = logging.getLogger(__name__)


def run_report(
    results: str | Path = "results",
    shards: str | Path = "data/shards",
    codebook: str | Path | None = "data/codebook/report.json",
    noise: str | Path | None = None,
) -> Path:
    results, shards = Path(results), Path(shards)
    runs, fits = load_inputs(results)
    read_bench_noise(noise)  # a malformed noise file fails here, before anything is rewritten
    archs = list(dict.fromkeys(runs.arch))
    out = fresh_dir(results / "report")
    fig_dir, curves = out / "figures", out / "curves"
    fig_dir.mkdir()
    curves.mkdir()
    floor = text_floors(shards)
    eq = equal_compute_table(fits, archs)
    figures: dict[str, Path] = {
        "loss_vs_compute": figs.loss_vs_compute(runs, fits, archs, fig_dir),
        "optimal_allocation": figs.optimal_allocation(fits, archs, fig_dir),
        "predicted_vs_observed": figs.predicted_vs_observed(results / "plot_data", archs, fig_dir),
        "loss_curves": figs.loss_curves(results / "points", runs, archs, curves, fig_dir),
    }
    why: dict[str, str] = {}
    if not eq.empty:
        figures["equal_compute"] = figs.equal_compute(eq, fig_dir)
    mix = figs.mixture_exponents(fits, fig_dir)
    if mix is not None:
        figures["mixture_exponents"] = mix
    emergence = figs.emergence_by_rank(runs, fig_dir)
    if emergence is not None:
        figures["emergence_by_rank"] = emergence
    else:
        why["emergence_by_rank"] = "the runs have no per-rank evaluation (real data)"
    routing = routings(results / "points", runs)
    if routing:
        figures["moe_routing"] = figs.moe_routing(routing, fig_dir)
    else:
        why["moe_routing"] = "no MoE arch with a routing record in this study"
    cb = json.loads(Path(codebook).read_text()) if codebook and Path(codebook).exists() else {}
    info = cb.get("information") or {}
    found = findings(runs, fits, info if "share_lost" in info else None)
    value = text_floors(shards, "image_value_nats_per_token")
    health = health_tables(runs, fits, floor, noise)
    md = render_markdown(results, runs, fits, floor, found, figures, why, eq, value, health,
                         load_sparsity(results), info)  # fmt: skip
    (results / "report.md").write_text(md)
    (results / "report.html").write_text(to_html(md, results))
    (out / "findings.json").write_text(json.dumps([f.__dict__ for f in found], indent=1))
    keep = ("transient", "laws", "noise", "bench_noise")
    (out / "health.json").write_text(json.dumps({k: health[k] for k in keep}, indent=1))
    tr = health["transient"]
    log.info("past the transient: %s (loss falls in %.1f%% of adjacent pairs, gains shrink in "
             "%.1f%% of budget triples)", tr["past_transient"], 100 * tr["falling_share"],
             100 * tr["decelerating_share"])  # fmt: skip
    for f in found:
        log.info("%s: %s (%s)", f.verdict.upper(), f.claim, f.reason)
    log.info("wrote %s and %s", results / "report.md", results / "report.html")
    return results / "report.md"


@entry_point
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--results", default="results", help="the grid's and fit's outputs")
    ap.add_argument("--shards", default="data/shards", help="for the entropy floor (info.json)")
    ap.add_argument("--codebook", default="data/codebook/report.json",
                    help="the codebook stage's report: the information its codes lose")  # fmt: skip
    ap.add_argument("--noise", default="bench/isoflop_noise.json",
                    help="bench/isoflop.py's two-seed noise, shown when the grid has one seed "
                         "and the bench ran this study's points")  # fmt: skip
    args = ap.parse_args(argv)
    run_report(args.results, args.shards, args.codebook, args.noise)
    return 0


if __name__ == "__main__":
    sys.exit(main())
