"""The grid flow: train every point of params ``grid`` that is not trained yet, and record it.

One skeleton, wherever the points run: plan the grid (flows/plan.py), take the results
directory's lock, open the launch's MLflow run, find what is done, order the rest into chains
(a group's points share one trunk, so they run one after another in ascending tokens), train
them with a progress bar, write ``runs.parquet`` and close the launch. *Where* they train is
the runner:

- here (flows/grid/local.py), the default: each point in its own process, at most
  ``grid.workers`` at once (one pinned thread on CPU, one GPU each where there are GPUs); done
  means ``results/points/<id>/record.json`` says ``ok``;
- on a Prefect work pool (flows/pool/submit.py), with ``grid.work_pool`` (or the flow's
  ``work_pool`` parameter): each chain is a flow run that the pool's workers, on any machine,
  run; done means the shared MLflow store has the point's finished run, and runs.parquet is
  written from the store.

A point whose id (flows/plan.py: a hash of its run config, data and code) is done is never
trained again: adding a size trains that size only, and a change to the code retrains the
points it touches. A crashed point is retried ``grid.retries`` times (it resumes from its
checkpoints); a point that still fails, or whose loss went NaN or diverged, is recorded as
``failed`` with its reason and the grid goes on.

Records: ``results/runs.parquet`` (flows/records.py); MLflow (flows/tracking.py): experiment
``nmm-<grid.study>``, a run per launch, one run per point (reused when a point is retried,
resumed or launched again). Prefect runs in its ephemeral mode unless ``PREFECT_API_URL``
points at a server; its settings for this project are in prefect.toml. The command line is
flows/grid/__main__.py.
"""

from __future__ import annotations

import os
import time
from collections import deque
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from prefect import flow, get_run_logger
from prefect.context import FlowRunContext
from tqdm import tqdm

from flows.devices import require_cuda
from flows.grid.local import LocalRunner
from flows.launch import Launch, exclusive
from flows.plan import CODE, Job, chains, check_inputs, check_plan, fingerprints, plan
from flows.pool.submit import PoolRunner
from flows.tracking import Tracker
from stages.common.paths import resolve
from stages.common.provenance import git_revision
from stages.params import load_params


class Runner(Protocol):
    """Where the points of a launch train (here, or on a work pool)."""

    where: str  # for the log: "2 at once on CPU", "work pool 'gpu'"
    counts: dict[str, float]  # the launch summary's runner-specific numbers, kept up to date

    def done(self, jobs: list[Job]) -> set[str]:
        """The point ids of ``jobs`` already trained (they are not trained again)."""

    def run(self, ready: deque[deque[Job]], progress: tqdm) -> None:
        """Train the chains; advance ``progress`` by each point that ends."""

    def table(self, jobs: list[Job]) -> tuple[Path, list[dict[str, Any]], list[Job]]:
        """runs.parquet of ``jobs``: its path, its rows, and the jobs without a record."""


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
        artifacts=[launch.params_path] if launch.params_path else [],
    )


@flow(name="nmm-grid")
def grid_flow(
    params_path: str = "params.yaml",
    shards: str = "data/shards",
    codebook: str = "data/codebook/codebook.pt",
    results: str = "results",
    tracking_uri: str | None = None,
    work_pool: str | None = None,
) -> dict[str, Any]:
    """Train every point of the grid in params.yaml that is not trained yet, and record it.

    Args:
        params_path: the study (params.yaml): sections grid, model, train, data.
        shards: the shards directory (stage shards).
        codebook: the visual codebook (stage codebook); needed by discrete archs only.
        results: where records (points/), trunks (groups/) and runs.parquet go.
        tracking_uri: MLflow store; default MLFLOW_TRACKING_URI, else sqlite:///<repo>/mlflow.db.
        work_pool: train on this Prefect work pool's workers (default: params grid.work_pool;
            none there: train here).
    """
    logger = get_run_logger()
    t0 = time.monotonic()
    params_file = resolve(params_path)
    params = load_params(params_file)
    shards_dir, results_dir, cb = resolve(shards), resolve(results), resolve(codebook)
    check_inputs(params, shards_dir, cb)
    cb = cb if cb.exists() else None
    fp = fingerprints(shards_dir, cb)
    jobs = plan(params, fp)
    check_plan(jobs, params)
    pool = work_pool or params.grid.work_pool
    if not pool and params.train.device == "cuda":  # here, not on a pool's machines
        require_cuda()
    with exclusive(results_dir):
        tracker = Tracker(params.grid.study, tracking_uri)
        rev = str(git_revision(paths=CODE))
        launch = Launch(params, params_file, shards_dir, cb, results_dir, fp, rev, tracker)
        if pool:
            paths = {"shards": shards, "codebook": codebook, "results": results}
            runner: Runner = PoolRunner(launch, pool, paths)
        else:
            runner = LocalRunner(launch, jobs)
        done = runner.done(jobs)
        todo = [j for j in jobs if j.point_id not in done]
        ready = deque(chains(todo, params.train.branch_cooldowns))
        _start_launch(launch, jobs, todo)
        logger.info(
            "grid '%s': %d points, %d already trained, %d to train in %d chain(s) on %s; "
            "MLflow %s, experiment %s", params.grid.study, len(jobs), len(done), len(todo),
            len(ready), runner.where, tracker.uri, tracker.experiment,
        )  # fmt: skip
        bar = tqdm(total=len(jobs), initial=len(done), desc="grid", unit="point")
        ok = False
        try:
            runner.run(ready, bar)
            ok = True
        finally:
            bar.close()
            table, rows, missing = runner.table(jobs)
            summary = {
                "points": len(jobs),
                "skipped": len(done),
                "trained": len(todo),
                "ok": sum(r.get("status") == "ok" for r in rows),
                "failed": sum(r.get("status") != "ok" for r in rows) + len(missing),
                "wall_s": round(time.monotonic() - t0, 3),
                "cpu_s": round(sum(os.times()[:2]), 3),  # this (the grid) process's CPU
                **runner.counts,
            }
            tracker.end_launch({f"launch/{k}": float(v) for k, v in summary.items()}, [table], ok)
    for job in missing:
        logger.warning("%s (%s): no record", job.label, job.point_id)
    if summary["failed"]:
        logger.warning("%d point(s) failed: see the 'error' column of %s", summary["failed"], table)
    logger.info("grid done: %s", summary)
    return {**summary, "runs": str(table), "tracking_uri": tracker.uri,
            "experiment": tracker.experiment, "parent_run_id": tracker.parent_id}  # fmt: skip
