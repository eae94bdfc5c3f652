"""Points trained here: each in its own process, one slot (a GPU, or a pinned CPU thread) each.

At most ``grid.workers`` points run at once (one per GPU where there are GPUs:
flows/devices.py); a chain's points run one after another in its slot, the next chain starts
when a slot frees (the longest chains first: flows/plan.py). Done means the point's
``results/points/<id>/record.json`` says ``ok``; records and runs.parquet are written after
every point (flows/launch.py :class:`Recorder`).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prefect import get_run_logger
from prefect.futures import PrefectFuture, as_completed
from prefect.utilities.annotations import quote
from tqdm import tqdm

from flows import records
from flows.devices import device_slots
from flows.launch import Launch, Recorder
from flows.plan import Job
from flows.tasks import crash_record, train_point_task


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


class LocalRunner:
    """The grid flow's runner for points trained on this machine."""

    def __init__(self, launch: Launch, jobs: list[Job]):
        self.launch, self.slots = launch, device_slots(launch.params)
        self.recorder = Recorder(jobs, launch)
        gpus = self.slots[0] is not None
        self.where = f"{len(self.slots)} at once on " + (
            "GPUs " + ",".join(map(str, self.slots)) if gpus else "CPU"
        )
        self.counts: dict[str, float] = {"workers": len(self.slots), "finish_s": 0.0}

    def done(self, jobs: list[Job]) -> set[str]:
        results = self.launch.results
        done = {j.point_id: records.read_record(results, j.point_id) for j in jobs}
        done = {pid: rec for pid, rec in done.items() if records.is_done(rec)}
        for job in jobs:
            if job.point_id in done:
                self.recorder.adopt(job, done[job.point_id])
        self.recorder.write()
        return set(done)

    def run(self, ready: deque[deque[Job]], progress: tqdm) -> None:
        retries = self.launch.params.grid.retries
        task = train_point_task.with_options(retries=retries)

        def submit(job: Job, slot: str | None) -> PrefectFuture:
            return task.submit(job.label, quote(job), quote(self.recorder), slot)

        failed = 0
        for job, future in run_chains(ready, self.slots, submit):
            rec, system = _outcome(job, future, 1 + retries)
            t0 = time.monotonic()
            self.recorder.finish(job, rec, system)
            self.counts["finish_s"] += time.monotonic() - t0  # the grid's MLflow and records
            failed += rec.get("status") != "ok"
            progress.update(1)
            progress.set_postfix(failed=failed)
        self.recorder.drain()  # (MLflow calls kept while the server was unreachable)

    def table(self, jobs: list[Job]) -> tuple[Path, list[dict[str, Any]], list[Job]]:
        rows = self.recorder.rows
        return self.recorder.table, list(rows.values()), [j for j in jobs if j.point_id not in rows]


def _outcome(job: Job, future: PrefectFuture, attempts: int) -> tuple[dict, dict]:
    """(record, system metrics) of a finished point task; a crash on every attempt is a
    failed record with its reason."""
    try:
        out = future.result()
        return out["record"], out["system"]
    except Exception as e:
        get_run_logger().error("%s: failed after %d attempt(s): %s", job.label, attempts, e)
        return crash_record(job, e), {}
