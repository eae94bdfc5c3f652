"""What the local grid (flows/grid/local.py) and a work pool's chains (flows/pool/worker.py)
share: the Prefect task that trains one point in its own process, and the record of a point
whose process never returned one."""

from __future__ import annotations

import os
import time
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.context import TaskRunContext

from flows import records
from flows.launch import Recorder
from flows.plan import Job
from flows.supervise import train_process


@task(name="train-point", task_run_name="{label}", cache_policy=NO_CACHE, retry_delay_seconds=2)
def train_point_task(label: str, job: Job, recorder: Recorder, gpu: str | None) -> dict[str, Any]:
    """Train one point in its own process (retried from its checkpoints if it crashes). A
    point whose record says ok is returned as it is: a retry after the point ended starts no
    process."""
    logger = get_run_logger()
    launch = recorder.launch
    ctx = TaskRunContext.get()
    attempt = ctx.task_run.run_count if ctx else 1
    t0 = time.monotonic()
    recorder.start(job)  # (its run, whoever trained the point: the record's end goes there)
    started = time.monotonic() - t0
    ended = records.read_record(launch.results, job.point_id)
    if records.is_done(ended):  # an earlier attempt trained it, then the task failed (e.g.
        # Prefect's API did not take the task's end): its record is the result, no process
        logger.warning("%s (%s): attempt %d: trained by an earlier attempt, not started again",
                       label, job.point_id, attempt)  # fmt: skip
        return {"record": ended, "system": {"mlflow_start_seconds": started}}
    where = f"GPU {gpu}" if gpu is not None else f"CPU, {launch.params.train.threads} thread(s)"
    if os.environ.get("NMM_WORKER"):  # a work pool's worker (flows/pool/)
        where += f", worker {os.environ['NMM_WORKER']}"
    logger.info("%s (%s): start, attempt %d, on %s", label, job.point_id, attempt, where)
    out = train_process(job, launch, gpu)
    out["system"]["mlflow_start_seconds"] = started
    rec = out["record"]
    if rec.get("status") == "ok":
        logger.info(
            "%s: ok, loss_avg %.4f, %d steps, %.0f tokens/s, %.1f s",
            label,
            rec.get("loss_avg") or float("nan"),
            rec.get("steps") or 0,
            rec.get("tokens_per_s") or 0.0,
            rec.get("wall_s") or 0.0,
        )
    else:
        logger.warning("%s: failed: %s", label, rec.get("error"))
    return out


def crash_record(job: Job, error: BaseException | str) -> dict[str, Any]:
    """The record of ``job`` when its process crashed on every attempt."""
    return records.crash_record(job.point.to_dict(), job.point_id, job.group_id, job.code,
                                str(error))  # fmt: skip
