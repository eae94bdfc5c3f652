"""Stage ``fit``: L(N, D) = E + A/N^alpha + B/D^beta per (arch, target), as the paper fits it.

``python -m stages.fit --runs TABLE --out fits.json [--plots DIR] [--plot-data DIR]
[--params params.yaml] [--no-mlflow]`` reads any table of runs (columns N, D, loss, optionally
arch, target, C, N_v, D_v), fits every (arch, target) with the method of Shukor et al. 2025,
App. C, writes fits.json (DVC metrics), the figures and their data, and logs and registers the
fits in MLflow. The library is stages/scaling/ (fit.py: the fits, exponents, intervals and
extrapolation check; law.py: the law and its search; plots.py: figures; tracking.py: MLflow
runs and the registered model).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from stages.common.inputs import require
from stages.common.stage import entry_point
from stages.data.shard_format import text_floors
from stages.params import FAMILY_NAMES, REPO_PARAMS, FitParams, load_params
from stages.scaling import predictive
from stages.scaling.fit import TargetFit, finite, fit_table, write_metrics
from stages.scaling.runs import FitError, load_runs
from stages.scaling.sparsity import fit_sparsity_table

log = logging.getLogger(__name__)


def run_fit(
    runs_path: str | Path,
    out: str | Path,
    fit: FitParams,
    seed: int = 0,
    plots: str | Path | None = None,
    use_mlflow: bool = True,
    plot_data: str | Path | None = None,
    floors: dict[str, float] | None = None,
    mixtures: dict[str, dict[str, float]] | None = None,
    sparsity_out: str | Path | None = None,
) -> dict[str, TargetFit]:
    """The whole stage: read runs, fit every target, write fits.json, figures, MLflow records;
    with ``sparsity_out``, the sparsity-aware MoE laws there ({} unless the grid swept the
    expert count)."""
    table = load_runs(runs_path)
    fits = fit_table(table, fit, seed, floors, mixtures)
    write_metrics(fits, out)
    log.info("wrote %s (%d fits)", out, len(fits))
    sparse = {}
    if sparsity_out is not None:
        sparse = fit_sparsity_table(table, fit, seed)
        write_metrics(sparse, sparsity_out)
        log.info("wrote %s (%d sparsity-aware laws)", sparsity_out, len(sparse))
    files = None
    if plots is not None:
        from stages.scaling.plots import write_plots  # matplotlib only when asked

        files = write_plots(fits, plots, plot_data)
    if use_mlflow:
        from stages.scaling.tracking import log_fits  # mlflow only when asked

        extra = [sparsity_out] if sparse else []
        log_fits(fits, fit, plot_files=files, runs_path=runs_path, fits_path=out, extra=extra)
    return fits


def predict(
    fits_path: str | Path, N: float, D: float, arch: str | None, target: str | None
) -> dict[str, Any]:
    """What the chosen law of ``arch/target`` in a fits.json predicts at (N, D), with its
    prediction interval (stages/scaling/predictive.py): a JSON-ready dict."""
    fits = json.loads(Path(fits_path).read_text())
    archs = sorted({k.split("/")[0] for k in fits})
    if arch is None:
        if len(archs) != 1:
            raise FitError(f"{fits_path} has archs {', '.join(archs)}: say which with --arch")
        arch = archs[0]
    targets = sorted(k.split("/", 1)[1] for k in fits if k.split("/")[0] == arch)
    if target is None:
        target = "avg" if "avg" in targets else targets[0] if len(targets) == 1 else None
        if target is None:
            raise FitError(f"{arch} has targets {', '.join(targets)}: say which with --target")
    entry = fits.get(f"{arch}/{target}")
    if entry is None:
        raise FitError(f"no fit {arch}/{target} in {fits_path}; it has {', '.join(sorted(fits))}")
    try:
        p = predictive.predict(entry, N, D)
    except ValueError as e:
        raise FitError(f"{arch}/{target}: {e}") from None
    out = {
        "arch": arch,
        "target": target,
        "law": entry.get("law", "paper"),
        "N": N,
        "D": D,
        "L": float(p["L"][0]),
        "level": p["level"],
        "low": float(p["low"][0]),
        "high": float(p["high"][0]),
        "families": {
            f: [float(p[f"{f}_low"][0]), float(p[f"{f}_high"][0])] for f in p["families"]
        },  # fmt: skip
        "one_basin": p["one_basin"],
        "coverage": entry.get("coverage"),
    }
    return finite(out)


def describe(p: dict[str, Any]) -> str:
    """A prediction as a sentence (for people; ``--json`` for machines)."""
    head = f"{p['arch']}/{p['target']} ({p['law']} law) at N={p['N']:g}, D={p['D']:g}: L = {p['L']:.6g}"
    if p["low"] is None or p["high"] is None:
        why = ("the fit has no bootstrap, fit.bootstrap: 0" if not p["families"] else
               "a family's resamples or residuals are too few here: "
               + ", ".join(f"{f} {'none' if lo is None else 'ok'}"
                           for f, (lo, _) in p["families"].items()))  # fmt: skip
        return f"{head} (no interval: {why})"
    spans = ", ".join(f"{f} [{lo:.4g}, {hi:.4g}]" for f, (lo, hi) in p["families"].items())
    text = f"{head}, {p['level']:.0%} prediction interval [{p['low']:.6g}, {p['high']:.6g}]"
    text += f" (parameters, run scatter{', law family' if len(p['families']) > 1 else ''}: {spans})"
    if p.get("one_basin"):
        text += ("; WARNING: the resamples never left the optimum's basin while another fits "
                 "nearly as well, so the interval is too narrow by an unknown amount")  # fmt: skip
    cov = p.get("coverage") or {}
    if cov.get("heldout") is not None or cov.get("loso") is not None:
        parts = [f"{cov[w]:.0%} of {cov[f'{w}_n']} {name}" for w, name in
                 (("heldout", "top-compute runs"), ("loso", "runs of a left-out size"))
                 if cov.get(w) is not None]  # fmt: skip
        text += f"; such intervals covered {' and '.join(parts)} when refitted without them"
    return text


@entry_point
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["predict"]:
        pp = argparse.ArgumentParser(
            prog="python -m stages.fit predict",
            description="Print the loss a fitted law predicts at (N, D) and its prediction "
            "interval at fit.ci (the parameters' bootstrap, the runs' scatter about the law, and "
            "the law families the choice could not separate): for planning a run.",
        )
        pp.add_argument("--fits", default="results/fits.json")
        pp.add_argument("--N", type=float, required=True, help="parameters (the table's N)")
        pp.add_argument("--D", type=float, required=True, help="tokens (the table's D)")
        pp.add_argument("--arch", default=None, help="default: the only arch")
        pp.add_argument("--target", default=None, help="default: avg, or the only target")
        pp.add_argument("--json", action="store_true", help="print JSON (L, low, high, ...)")
        a = pp.parse_args(argv[1:])
        require(a.fits, "fit", "the fits")
        p = predict(a.fits, a.N, a.D, a.arch, a.target)
        print(json.dumps(p) if a.json else describe(p))
        return 0
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog="`python -m stages.fit predict --help`: the loss a fitted law predicts.",
    )
    ap.add_argument("--runs", default="results/runs.parquet", help="table of runs (.csv/.parquet)")
    ap.add_argument("--out", default="results/fits.json")
    ap.add_argument("--plots", default=None, help="directory for the figures (PNG)")
    ap.add_argument(
        "--plot-data", default=None, help="directory for the figures' data (CSV; default: --plots)"
    )
    ap.add_argument(
        "--params",
        default=None,
        help="params.yaml for the fit settings (default: ./params.yaml, else the repository's)",
    )
    ap.add_argument(
        "--law",
        default=None,
        choices=["auto", *FAMILY_NAMES],
        help="the law family to report (default: fit.law; auto: chosen by extrapolation)",
    )
    ap.add_argument(
        "--floors",
        default=None,
        help="the shards' info.json (or its directory): the corpus's floor per target, for the "
        "floor family",
    )
    ap.add_argument(
        "--sparsity",
        default=None,
        help="also fit the sparsity-aware MoE law (paper Table 12) across expert counts and "
        "write it here (JSON; {} when the runs have one expert count per arch)",
    )
    ap.add_argument("--no-mlflow", action="store_true", help="do not log or register in MLflow")
    args = ap.parse_args(argv)
    if args.params is None and not Path("params.yaml").exists():
        log.info("no params.yaml here: the fit settings of %s", REPO_PARAMS)
        params = load_params(REPO_PARAMS)
    else:
        params = load_params(args.params or "params.yaml")
    require(args.runs, "grid", "the runs table")
    if args.floors:
        require(args.floors, "shards", "the shards' info (--floors)")
    fit = params.fit
    if args.law is not None:
        families = list(
            dict.fromkeys([*fit.families, args.law] if args.law != "auto" else fit.families)
        )
        fit = fit.model_copy(update={"law": args.law, "families": families})
    floors = text_floors(args.floors) if args.floors else None
    mixtures = {k: m.as_dict() for k, m in params.grid.mixtures.items()}
    run_fit(
        args.runs, args.out, fit, params.seed, args.plots, not args.no_mlflow,
        args.plot_data, floors, mixtures, args.sparsity,
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
