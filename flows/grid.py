"""The grid flow: train every point of params ``grid`` once, concurrently, and record it.

``python -m flows.grid run`` (what ``dvc repro`` runs) expands ``grid.archs x sizes x tokens x
mixtures x seeds`` (flows/plan.py) and trains each point in its own process (``python -m
flows.train``, supervised by flows/supervise.py; one pinned thread on CPU, one GPU each where
there are GPUs), at most ``grid.workers`` at once. The points of a group (same arch, size, mixture and seed) share
one constant-lr trunk, so they run one after another in ascending tokens; groups run
concurrently. A point whose ``results/points/<id>/record.json`` says ``ok`` for the same point
id (a hash of everything that changes its result, the code included: flows/plan.py) is never
trained again: adding a size trains that size only, and a change to the code retrains the
points it touches. ``python -m flows.grid plan`` prints every point with its ids and whether it
is done or will train, without training. A crashed point is retried ``grid.retries`` times (it resumes from its
checkpoints); a point that still fails, or whose loss went NaN or diverged, is recorded as
``failed`` with its reason and the grid goes on.

Records: ``results/runs.parquet`` (flows/records.py), rewritten after every finished point;
MLflow (flows/tracking.py): experiment ``nmm-<grid.study>``, a run per launch, one run per
point (reused when a point is retried, resumed or launched again). Progress: a
tqdm bar (points done / total, ETA) and Prefect logs per point.

Prefect runs in its ephemeral mode unless ``PREFECT_API_URL`` points at a server, so nothing
has to be started first; its settings for this project (home ``.prefect/``, no analytics, a
start-up timeout for a loaded laptop) are in prefect.toml, which Prefect reads from the
working directory. ``python -m flows.grid serve`` registers a deployment
(``flow.serve``) so grids can be started and scheduled from the Prefect UI with parameters.

With ``grid.work_pool`` set, the points are not trained here: each chain is a flow run on that
Prefect work pool, run by its workers on any machine (flows/pool.py), and runs.parquet is written
from the MLflow store.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.context import FlowRunContext
from prefect.futures import PrefectFuture, as_completed
from prefect.types.entrypoint import EntrypointType
from prefect.utilities.annotations import quote
from tqdm import tqdm

from flows import records
from flows.collect import collect
from flows.devices import check_batch_split, device_slots
from flows.launch import Launch, Recorder, exclusive
from flows.plan import CODE, Fingerprints, Job, chains, expand_grid, fingerprints, plan
from flows.pool import run_on_pool
from flows.tasks import crash_record, resolve, train_point_task
from flows.tracking import Tracker
from stages.common.provenance import git_revision
from stages.params import Params, ParamsError, load_params


def run_chains(
    ready: deque[deque[Job]],
    slots: list[str | None],
    submit: Callable[[Job, str | None], PrefectFuture],
) -> Iterator[tuple[Job, PrefectFuture]]:
    """Run the chains' jobs, one slot each, at most ``len(slots)`` at once; yield each job with
    its finished future. A chain's next job starts when its previous one has ended."""
    free, running = list(slots), {}
    while ready or running:
        while ready and free:
            chain, slot = ready.popleft(), free.pop(0)
            job = chain.popleft()
            running[submit(job, slot)] = (chain, job, slot)
        future = next(as_completed(list(running)))
        chain, job, slot = running.pop(future)
        free.append(slot)
        if chain:
            ready.appendleft(chain)  # finish a group before starting another
        yield job, future


def _outcome(job: Job, future: PrefectFuture, attempts: int) -> tuple[dict, dict]:
    """(record, system metrics) of a finished point task; a crash on every attempt is a
    failed record with its reason."""
    try:
        out = future.result()
        return out["record"], out["system"]
    except Exception as e:
        get_run_logger().error("%s: failed after %d attempt(s): %s", job.label, attempts, e)
        return crash_record(job, e), {}


def _start_launch(launch: Launch, jobs: list[Job], todo: list[Job]) -> None:
    """The launch's run in MLflow, tagged with its Prefect flow run."""
    ctx = FlowRunContext.get()
    flow_run = ctx.flow_run if ctx else None
    launch.tracker.start_launch(
        name=f"launch-{datetime.now():%Y%m%d-%H%M%S}",
        params={
            "grid": launch.params.grid.model_dump(),
            "params_path": str(launch.params_path),
            "results": str(launch.results),
            "data_fingerprint": launch.fingerprints.data,
        },
        tags={
            "prefect.flow_run_id": str(flow_run.id) if flow_run else "",
            "prefect.flow_run_name": flow_run.name if flow_run else "",
            "points": str(len(jobs)),
            "to_train": str(len(todo)),
            "git_revision": launch.git_revision,
        },
        artifacts=[launch.params_path],
    )


@flow(name="nmm-grid")
def grid_flow(
    params_path: str = "params.yaml",
    shards: str = "data/shards",
    codebook: str = "data/codebook/codebook.pt",
    results: str = "results",
    tracking_uri: str | None = None,
) -> dict[str, Any]:
    """Train every point of the grid in params.yaml that is not trained yet, and record it.

    Args:
        params_path: the study (params.yaml): sections grid, model, train, data.
        shards: the shards directory (stage shards).
        codebook: the visual codebook (stage codebook); needed by discrete archs only.
        results: where records (points/), trunks (groups/) and runs.parquet go.
        tracking_uri: MLflow store; default MLFLOW_TRACKING_URI, else sqlite:///<repo>/mlflow.db.
    """
    logger = get_run_logger()
    t0 = time.monotonic()
    params_file = resolve(params_path)
    params = load_params(params_file)
    shards_dir, results_dir, cb = resolve(shards), resolve(results), resolve(codebook)
    cb = cb if cb.exists() else None
    fp = fingerprints(shards_dir, cb)
    jobs = plan(params, fp)
    check_batch_split(params, (j.point for j in jobs), shards_dir)
    if params.grid.work_pool:
        paths = {"shards": shards, "codebook": codebook, "results": results}
        return _on_pool(params, params_file, jobs, cb, fp, tracking_uri, paths)
    slots = device_slots(params)

    with exclusive(results_dir):
        tracker = Tracker(params.grid.study, tracking_uri)
        rev = str(git_revision(paths=CODE))
        launch = Launch(params, params_file, shards_dir, cb, results_dir, fp, rev, tracker)
        done = {j.point_id: records.read_record(results_dir, j.point_id) for j in jobs}
        done = {pid: rec for pid, rec in done.items() if records.is_done(rec)}
        todo = [j for j in jobs if j.point_id not in done]
        ready = deque(chains(todo, params.train.branch_cooldowns))
        _start_launch(launch, jobs, todo)
        logger.info(
            "grid '%s': %d points, %d already trained, %d to train in %d chain(s), %d at once "
            "on %s; MLflow %s, experiment %s",
            params.grid.study,
            len(jobs),
            len(done),
            len(todo),
            len(ready),
            len(slots),
            "CPU" if slots[0] is None else "GPUs " + ",".join(map(str, slots)),
            tracker.uri,
            tracker.experiment,
        )
        recorder = Recorder(jobs, launch)
        for job in jobs:
            if job.point_id in done:
                recorder.adopt(job, done[job.point_id])
        recorder.write()

        task_ = train_point_task.with_options(retries=params.grid.retries)

        def submit(job: Job, slot: str | None) -> PrefectFuture:
            return task_.submit(job.label, quote(job), quote(recorder), slot)

        trained = failed = 0
        finish_s = 0.0  # the grid's MLflow and record writing after each point
        bar = tqdm(total=len(jobs), initial=len(done), desc="grid", unit="point")
        ok = False
        try:
            for job, future in run_chains(ready, slots, submit):
                rec, system = _outcome(job, future, 1 + params.grid.retries)
                t1 = time.monotonic()
                recorder.finish(job, rec, system)
                finish_s += time.monotonic() - t1
                trained += 1
                failed += rec.get("status") != "ok"
                bar.update(1)
                bar.set_postfix(failed=failed)
            ok = True
        finally:
            bar.close()
            summary = {
                "points": len(jobs),
                "skipped": len(done),
                "trained": trained,
                "ok": sum(r.get("status") == "ok" for r in recorder.rows.values()),
                "failed": failed,
                "wall_s": round(time.monotonic() - t0, 3),
                "workers": len(slots),
                "finish_s": round(finish_s, 3),
                "cpu_s": round(sum(os.times()[:2]), 3),  # this (the grid) process's CPU
            }
            metrics = {f"launch/{k}": float(v) for k, v in summary.items()}
            tracker.end_launch(metrics, [recorder.table], ok)
    if failed:
        logger.warning("%d point(s) failed: see the 'error' column of %s", failed, recorder.table)
    logger.info("grid done: %s", summary)
    return {
        **summary,
        "runs": str(recorder.table),
        "tracking_uri": tracker.uri,
        "experiment": tracker.experiment,
        "parent_run_id": tracker.parent_id,
    }


def _on_pool(
    params: Params, params_file: Path, jobs: list[Job], cb: Path | None, fp: Fingerprints,
    tracking_uri: str | None, paths: dict[str, str],
) -> dict[str, Any]:  # fmt: skip
    """``grid.work_pool``: every chain not yet in the MLflow store is a flow run on the pool
    (flows/pool.py); runs.parquet is written from the store."""
    logger = get_run_logger()
    t0 = time.monotonic()
    pool, study = params.grid.work_pool, params.grid.study
    results_dir = resolve(paths["results"])
    with exclusive(results_dir):
        tracker = Tracker(study, tracking_uri)
        rev = str(git_revision(paths=CODE))
        launch = Launch(params, params_file, resolve(paths["shards"]), cb, results_dir, fp, rev,
                        tracker)  # fmt: skip
        done = {r["point_id"] for r in collect(jobs, study, tracker.uri).rows
                if r.get("status") == "ok"}  # fmt: skip
        todo = [j for j in jobs if j.point_id not in done]
        ready = chains(todo, params.train.branch_cooldowns)
        _start_launch(launch, jobs, todo)
        logger.info(
            "grid '%s': %d points, %d already in MLflow, %d to train in %d chain(s) on work "
            "pool '%s'; MLflow %s, experiment %s", study, len(jobs), len(done), len(todo),
            len(ready), pool, tracker.uri, tracker.experiment,
        )  # fmt: skip
        if tracker.uri.startswith(("sqlite:", "file:")):
            logger.warning(
                "MLflow store %s is a local file: workers on other machines cannot reach it "
                "(their points would be recorded elsewhere); give the grid an MLflow server "
                "(--tracking-uri http://..., make ui)", tracker.uri,
            )  # fmt: skip
        bar = tqdm(total=len(jobs), initial=len(done), desc="grid", unit="point")
        ok, outcome = False, {}
        try:
            outcome = run_on_pool(ready, launch, pool, {**paths, "tracking_uri": tracker.uri},
                                  on_done=lambda chain, _: bar.update(len(chain)))  # fmt: skip
            ok = True
        finally:
            bar.close()
            table = results_dir / "runs.parquet"
            got = collect(jobs, study, tracker.uri, table)
            summary = {
                "points": len(jobs),
                "skipped": len(done),
                "trained": len(todo),
                "ok": sum(r.get("status") == "ok" for r in got.rows),
                "failed": sum(r.get("status") != "ok" for r in got.rows) + len(got.missing),
                "wall_s": round(time.monotonic() - t0, 3),
                "chains": len(ready),
                "resubmitted": sum(o["attempts"] - 1 for o in outcome.values()),
            }
            tracker.end_launch({f"launch/{k}": float(v) for k, v in summary.items()}, [table], ok)
    for job in got.missing:
        logger.warning("%s (%s): no record in MLflow", job.label, job.point_id)
    logger.info("grid done: %s", summary)
    return {**summary, "runs": str(table), "tracking_uri": tracker.uri,
            "experiment": tracker.experiment, "parent_run_id": tracker.parent_id}  # fmt: skip


# --------------------------------------------------------------------------- CLI


def print_plan(params_path: str, shards: str, codebook: str, results: str) -> int:
    """One line per point: point id, group id, label, ``done`` or ``train`` (no training)."""
    params = load_params(params_path)
    cb = resolve(codebook)
    jobs = plan(params, fingerprints(resolve(shards), cb if cb.exists() else None))
    todo = 0
    for j in jobs:
        done = records.is_done(records.read_record(resolve(results), j.point_id))
        todo += not done
        print(f"{j.point_id}  {j.group_id}  {j.label}  {'done' if done else 'train'}")
    print(f"{len(jobs)} points: {len(jobs) - todo} done, {todo} to train", file=sys.stderr)
    return 0


def collect_runs(args: argparse.Namespace) -> int:
    """``collect``: runs.parquet from the MLflow store (flows/collect.py)."""
    params = load_params(args.params)
    cb = resolve(args.codebook)
    jobs = plan(params, fingerprints(resolve(args.shards), cb if cb.exists() else None))
    out = Path(args.out) if args.out else resolve(args.results) / "runs.parquet"
    try:
        got = collect(jobs, params.grid.study, args.tracking_uri, out)
    except ValueError as e:  # a run whose record is another point's: the store is inconsistent
        print(f"error: {e}", file=sys.stderr)
        return 2
    for job in got.missing:
        print(f"missing: {job.point_id}  {job.label}", file=sys.stderr)
    print(f"{got.summary}; wrote {out}")
    return 0 if args.partial or not got.missing else 1


def main(argv: list[str] | None = None) -> int:
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
    )
    run.add_argument(
        "--strict", action="store_true", help="exit 1 if any point failed (default: exit 0)"
    )
    sub.add_parser(
        "plan",
        parents=[paths],
        help="dry run: print every point (point id, group id, label, done | train)",
        description="Print one line per point of the grid: its point id, its group id, its "
        "label and whether it is done or will train. Trains nothing, starts nothing.",
    )
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
    args = ap.parse_args(argv)

    try:  # fail before Prefect starts, with the key that is wrong
        params = load_params(args.params)
        if args.command == "run" and (resolve(args.shards) / "info.json").exists():
            check_batch_split(params, expand_grid(params), resolve(args.shards))
    except ParamsError as e:
        print(e, file=sys.stderr)
        return 2
    if args.command == "plan":
        return print_plan(args.params, args.shards, args.codebook, args.results)
    if args.command == "collect":
        return collect_runs(args)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # no network here
    kwargs = {
        "params_path": args.params,
        "shards": args.shards,
        "codebook": args.codebook,
        "results": args.results,
        "tracking_uri": args.tracking_uri,
    }
    if args.command == "serve":
        from flows.grid import grid_flow as importable  # not __main__: runs import it by name

        importable.serve(
            name=args.name,
            parameters=kwargs,
            cron=args.cron,
            interval=args.interval,
            tags=["nmm", "grid"],
            entrypoint_type=EntrypointType.MODULE_PATH,
        )
        return 0
    summary = grid_flow(**kwargs)
    return 1 if args.strict and summary["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
