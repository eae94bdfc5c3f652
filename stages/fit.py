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
import logging
import sys
from pathlib import Path

from stages.common.stage import setup_logging
from stages.params import REPO_PARAMS, FitParams, ParamsError, load_params
from stages.scaling.fit import FitError, TargetFit, fit_table, load_runs, write_metrics

log = logging.getLogger(__name__)


def run_fit(
    runs_path: str | Path,
    out: str | Path,
    fit: FitParams,
    seed: int = 0,
    plots: str | Path | None = None,
    use_mlflow: bool = True,
    plot_data: str | Path | None = None,
) -> dict[str, TargetFit]:
    """The whole stage: read runs, fit every target, write fits.json, figures, MLflow records."""
    fits = fit_table(load_runs(runs_path), fit, seed)
    write_metrics(fits, out)
    log.info("wrote %s (%d fits)", out, len(fits))
    files = None
    if plots is not None:
        from stages.scaling.plots import write_plots  # matplotlib only when asked

        files = write_plots(fits, plots, plot_data)
    if use_mlflow:
        from stages.scaling.tracking import log_fits  # mlflow only when asked

        log_fits(fits, fit, plot_files=files, runs_path=runs_path, fits_path=out)
    return fits


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
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
    ap.add_argument("--no-mlflow", action="store_true", help="do not log or register in MLflow")
    args = ap.parse_args(argv)
    setup_logging()
    try:
        if args.params is None and not Path("params.yaml").exists():
            log.info("no params.yaml here: the fit settings of %s", REPO_PARAMS)
            params = load_params(REPO_PARAMS)
        else:
            params = load_params(args.params or "params.yaml")
        run_fit(
            args.runs, args.out, params.fit, params.seed, args.plots, not args.no_mlflow,
            args.plot_data,
        )  # fmt: skip
    except (ParamsError, FitError) as e:
        log.error("%s", e)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
