"""``python -m flows.grid {run,plan,collect,serve}``: the grid of params.yaml from the command line.

- ``run`` (what ``dvc repro`` runs): the grid flow (flows/grid/flow.py), in Prefect's
  ephemeral mode unless ``PREFECT_API_URL`` is set: every point not trained yet, each in its
  own process, ``grid.workers`` at once here, or on a work pool's workers (``--work-pool`` or
  ``grid.work_pool``).
- ``plan``: the dry run. One line per point with its run config (flows/config.py): N, D, C,
  steps, batch, lr, and whether it is done or will train; ``--json``: one JSON object per line
  (keys ``point_id``, ``label``, ``arch``, ``size``, ``N``, ``D``, ``C``, ``steps``,
  ``batch_tokens``, ``lr``, ``status``, ...); ``--configs``: each point's whole run config.
  Works before any data exists (the vocabulary then comes from params, and points have no id
  yet: ids hash the data). Trains nothing, starts nothing.
- ``collect``: runs.parquet from the MLflow store alone (flows/collect.py), for grids whose
  points were trained on other machines.
- ``serve``: the grid as a Prefect deployment, to start and schedule grids from the UI.

Every command checks params.yaml first (a wrong key stops it, named, before anything starts);
``run`` also checks its inputs (the shards, and a codebook made from them for discrete archs)
and that ``train.processes`` splits every point's batch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from flows import records
from flows.devices import require_cuda
from flows.memory import estimate, gpu_hours, trained_steps
from flows.plan import Job, check_inputs, check_plan, fingerprints, plan
from stages.common.inputs import InputError
from stages.common.paths import resolve
from stages.params import Params, load_params

PLAN_COLUMNS = ("label", "N", "D", "C", "steps", "batch_tokens", "lr", "memory_gib",
                "gpu_hours", "status")  # fmt: skip


def _jobs(params: Params, args: argparse.Namespace) -> list[Job]:
    cb = resolve(args.codebook)
    return plan(params, fingerprints(resolve(args.shards), cb if cb.exists() else None))


def plan_rows(jobs: list[Job], results: Path, params: Params) -> list[dict]:
    """The plan's rows: each point's ids, run-config summary, memory per device (GiB) and its
    parts, GPU-hours (its whole run; ``gpu_hours_trained``: what the grid spends on it, shared
    trunks counted once) and status (done | train)."""
    rows = []
    trained = trained_steps([j.config for j in jobs])
    for j, steps in zip(jobs, trained, strict=True):
        rec = records.read_record(results, j.point_id) if j.point_id else None
        status = "done" if records.is_done(rec) else "train"
        mem = estimate(j.config, params.plan.image_share)
        cost = {
            "memory_gib": mem.gib,
            "memory": {
                k: v / 2**30 if isinstance(v, float) else v for k, v in mem.as_dict().items()
            },
            "gpu_hours": gpu_hours(j.config, params),
            "gpu_hours_trained": gpu_hours(j.config, params, steps),
        }
        rows.append({"point_id": j.point_id, "group_id": j.group_id, "label": j.label,
                     **j.config.summary(), **cost, "status": status})  # fmt: skip
    return rows


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return "-" if v is None else str(v)


def print_plan(params: Params, args: argparse.Namespace) -> int:
    jobs = _jobs(params, args)
    rows = plan_rows(jobs, resolve(args.results), params)
    if args.configs:
        for j in jobs:
            print(j.config.to_json())
    elif args.json:
        for r in rows:
            print(json.dumps(r))
    else:
        cols = ("point_id", *PLAN_COLUMNS)
        cells = [[_cell(r[c]) for c in cols] for r in rows]
        widths = [max(len(c), *(len(x[i]) for x in cells)) for i, c in enumerate(cols)]
        print("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)))
        for x in cells:
            print("  ".join(v.ljust(w) for v, w in zip(x, widths, strict=True)))
    todo = sum(r["status"] == "train" for r in rows)
    note = "" if rows and rows[0]["point_id"] else " (no shards yet: ids come with the data)"
    print(f"{len(rows)} points: {len(rows) - todo} done, {todo} to train{note}", file=sys.stderr)
    pl, left = params.plan, sum(r["gpu_hours_trained"] for r in rows if r["status"] == "train")
    print(
        f"peak memory per device {max(r['memory_gib'] for r in rows):.3g} GiB (of "
        f"{pl.gpu_memory_gib:g}; {rows[0]['memory']['precision']}); GPU-hours "
        f"{sum(r['gpu_hours_trained'] for r in rows):.4g} in all, {left:.4g} to train (at "
        f"{pl.mfu:.0%} MFU of {pl.gpu_peak_tflops:g} TFLOP/s; shared trunks counted once)",
        file=sys.stderr,
    )
    try:
        check_plan(jobs, params)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def collect_runs(params: Params, args: argparse.Namespace) -> int:
    """``collect``: runs.parquet from the MLflow store (flows/collect.py)."""
    from flows.collect import collect

    out = Path(args.out) if args.out else resolve(args.results) / "runs.parquet"
    try:
        got = collect(_jobs(params, args), params.grid.study, args.tracking_uri, out)
    except ValueError as e:  # a run whose record is another point's: the store is inconsistent
        print(f"error: {e}", file=sys.stderr)
        return 2
    for job in got.missing:
        print(f"missing: {job.point_id}  {job.label}", file=sys.stderr)
    print(f"{got.summary}; wrote {out}")
    return 0 if args.partial or not got.missing else 1


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m flows.grid",
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = ap.add_subparsers(dest="command", required=True)
    paths = argparse.ArgumentParser(add_help=False)
    paths.add_argument("--params", default="params.yaml", help="the study (default %(default)s)")
    paths.add_argument("--shards", default="data/shards", help="(default %(default)s)")
    paths.add_argument(
        "--codebook", default="data/codebook/codebook.pt", help="(default %(default)s)"
    )
    paths.add_argument("--results", default="results", help="(default %(default)s)")
    paths.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite:///<repo>/mlflow.db)",
    )
    run = sub.add_parser(
        "run",
        parents=[paths],
        help="train the grid now (ephemeral Prefect unless PREFECT_API_URL is set)",
        description="Train every point not trained yet, at most grid.workers at once here, or "
        "on a Prefect work pool's workers.",
    )
    run.add_argument("--work-pool", default=None,
                     help="train on this work pool (default: params grid.work_pool)")  # fmt: skip
    run.add_argument(
        "--strict", action="store_true", help="exit 1 if any point failed (default: exit 0)"
    )
    p = sub.add_parser(
        "plan",
        parents=[paths],
        help="dry run: every point's run config and status, before anything runs",
        description="Print one line per point of the grid: its point id, label, N, D, C, "
        "steps, batch tokens, peak lr and whether it is done or will train. Trains nothing, "
        "starts nothing; works before the data exists.",
    )
    what = p.add_mutually_exclusive_group()
    what.add_argument("--json", action="store_true", help="one JSON object per point")
    what.add_argument("--configs", action="store_true",
                      help="each point's whole run config, one JSON per line")  # fmt: skip
    gather = sub.add_parser(
        "collect",
        parents=[paths],
        help="write runs.parquet from the MLflow store (points trained on other machines)",
        description="Plan the grid here, find each point's run in the MLflow store by its "
        "point id and write runs.parquet from the records the runs carry (flows/collect.py). "
        "Points trained by other code or data have other ids and are not collected.",
    )
    gather.add_argument("--out", default=None, help="(default RESULTS/runs.parquet)")
    gather.add_argument(
        "--partial", action="store_true", help="exit 0 even if some points are missing"
    )
    serve = sub.add_parser(
        "serve",
        parents=[paths],
        help="register a deployment and serve it: start and schedule grids from the Prefect UI",
        description="Serve the grid flow as a deployment (flow.serve). Start a server first "
        "(`prefect server start --host 127.0.0.1`) and export PREFECT_API_URL="
        "http://127.0.0.1:4200/api, then start runs (with parameters) from the UI. The path "
        "options set the deployment's default parameters; runs execute in this process's "
        "working directory.",
    )
    serve.add_argument("--name", default="grid", help="deployment name (default %(default)s)")
    when = serve.add_mutually_exclusive_group()
    when.add_argument("--cron", help="schedule, e.g. '0 3 * * *'")
    when.add_argument("--interval", type=float, help="schedule: every this many seconds")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:  # fail before Prefect starts, with the key or the file that is wrong
        params = load_params(args.params)
        if args.command == "run":
            check_inputs(params, resolve(args.shards), resolve(args.codebook))
            check_plan(_jobs(params, args), params)
            if not (args.work_pool or params.grid.work_pool) and params.train.device == "cuda":
                require_cuda()  # trains here: a GPU must be usable here
    except InputError as e:  # a bad params file, a missing or stale input
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.command == "plan":
        try:
            return print_plan(params, args)
        except BrokenPipeError:  # `plan | head`: the reader has what it wanted
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
    if args.command == "collect":
        return collect_runs(params, args)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # no network here
    kwargs = {
        "params_path": args.params,
        "shards": args.shards,
        "codebook": args.codebook,
        "results": args.results,
        "tracking_uri": args.tracking_uri,
    }
    from prefect.types.entrypoint import EntrypointType  # Prefect only once inputs are good

    from flows.grid.flow import grid_flow

    if args.command == "serve":
        grid_flow.serve(
            name=args.name,
            parameters=kwargs,
            cron=args.cron,
            interval=args.interval,
            tags=["nmm", "grid"],
            entrypoint_type=EntrypointType.MODULE_PATH,
        )
        return 0
    summary = grid_flow(**kwargs, work_pool=args.work_pool)
    return 1 if args.strict and summary["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
