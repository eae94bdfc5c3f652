"""The flow a work pool's worker runs: one chain of grid points, recorded in the shared MLflow.

``train-chain`` receives the study (params, validated again here), the chain's point ids and
this machine's paths (relative ones are the deployment's working directory, the checkout). It
plans the grid with this worker's code and data: a point id it does not find (another commit,
data not pulled) fails the flow run before any training. Each point then trains in its own
process as on the grid's own machine (flows/tasks.py), with this worker's GPUs (its
environment, set when it started: flows/pool/deploy.py), and its record, curve and artifacts go
to MLflow; a point already done on this machine (an earlier attempt) is recorded, not trained,
and one whose run in the shared MLflow store is finished (the chain ran before on another
machine) is skipped. With a shared checkpoint store (``train.checkpoint_store``) a chain
resubmitted elsewhere resumes its trunk and its points where they were.
"""

from __future__ import annotations

import os
from typing import Any

from prefect import flow, get_run_logger

from flows import records
from flows.launch import Launch, Recorder
from flows.plan import CODE, fingerprints, plan
from flows.pool import FLOW
from flows.tasks import crash_record, train_point_task
from flows.tracking import Tracker
from stages.common.paths import resolve
from stages.common.provenance import git_revision
from stages.params import validate_params


def worker_name() -> str:
    return os.environ.get("NMM_WORKER") or os.uname().nodename


@flow(name=FLOW, flow_run_name="{label}", persist_result=False)
def train_chain(
    label: str,
    point_ids: list[str],
    params: dict[str, Any],
    shards: str = "data/shards",
    codebook: str = "data/codebook/codebook.pt",
    results: str = "results",
    tracking_uri: str | None = None,
    launch_run_id: str | None = None,
) -> dict[str, Any]:
    """Train the points ``point_ids`` (one chain, in order) on this worker and record them in
    MLflow. ``params``: the study, validated again here; paths are this machine's (relative
    ones to the deployment's working directory, the checkout)."""
    logger = get_run_logger()
    p = validate_params(params)
    results_dir = resolve(results)
    cb = resolve(codebook) if resolve(codebook).exists() else None
    fp = fingerprints(resolve(shards), cb)
    by_id = {j.point_id: j for j in plan(p, fp)}
    unknown = [pid for pid in point_ids if pid not in by_id]
    if unknown:
        raise RuntimeError(
            f"worker {worker_name()}: point(s) {', '.join(unknown)} are not in the plan this "
            "worker's code and data give (another commit, or data not pulled): check out the "
            "grid's commit and `dvc pull` here"
        )
    jobs = [by_id[pid] for pid in point_ids]
    gpus = [g for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip()]
    if p.train.processes > 1 and gpus and len(gpus) < p.train.processes:
        raise RuntimeError(
            f"worker {worker_name()} has GPU(s) {','.join(gpus)} but train.processes="
            f"{p.train.processes}: start it with that many (--gpu 0,1)"
        )
    tracker = Tracker(p.grid.study, tracking_uri)
    tracker.parent_id = launch_run_id
    rev = str(git_revision(paths=CODE))
    launch = Launch(p, None, resolve(shards), cb, results_dir, fp, rev, tracker)
    recorder = Recorder(jobs, launch, table=False)
    task = train_point_task.with_options(retries=p.grid.retries)
    ok = 0
    for job in jobs:
        rec = records.read_record(results_dir, job.point_id)
        if records.is_done(rec):  # trained by an earlier attempt on this machine
            recorder.adopt(job, rec)
        elif not tracker.needs_finish(job.point_id):  # trained and recorded on another machine
            logger.info("%s: its run in MLflow is finished (another machine): skipped", job.label)
            ok += 1
            continue
        else:
            try:
                out = task(job.label, job, recorder, None)  # (its GPUs: the worker's env)
                rec, system = out["record"], out["system"]
            except Exception as e:
                logger.error("%s: failed: %s", job.label, e)
                rec, system = crash_record(job, e), {}
            recorder.finish(job, rec, system)
        ok += rec.get("status") == "ok"
    recorder.drain()  # (MLflow calls kept while the server was unreachable)
    logger.info("%s: %d/%d points ok on worker %s", label, ok, len(jobs), worker_name())
    return {"points": len(jobs), "ok": ok, "worker": worker_name()}
