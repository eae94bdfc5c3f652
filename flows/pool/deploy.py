"""Setting up a work pool: the pool, its deployment, the zombie automation, and its workers.

- :func:`deploy` creates the process work pool (a concurrency limit of as many runs as
  workers), the deployment ``train-chain/<pool>`` of flows/pool/worker.py, and the automation
  that marks a flow run whose heartbeats stopped as Crashed (so the grid resubmits it);
- a worker is ``prefect worker start --type process --limit 1`` with its device pinned
  (``CUDA_VISIBLE_DEVICES``: one worker per GPU, or per CPU slot) and flow-run heartbeats on
  (:func:`worker_command`, :func:`worker_env`);
- :func:`up` does both on this machine and keeps the workers until it is stopped (Ctrl-C,
  SIGTERM or SIGHUP: they stop with it).
"""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

from flows.pool import deployment_name
from stages.common.paths import ROOT
from stages.common.processes import die_with_parent, stop_on_signals

HEARTBEAT_S = 30  # flow-run heartbeats of the workers' runs (Prefect's minimum)
ZOMBIE_AFTER_S = 90  # a run whose heartbeats stopped this long ago is marked Crashed


def deploy(pool: str, workers: int, source: str | None, zombie_after: float) -> None:
    """The process work pool (concurrency limit ``workers``), the ``train-chain/<pool>``
    deployment and the automation that marks runs whose heartbeats stopped as Crashed."""
    from prefect.automations import Automation
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(
                WorkPoolCreate(name=pool, type="process", concurrency_limit=workers)
            )
        except ObjectAlreadyExists:
            client.update_work_pool(pool, WorkPoolUpdate(concurrency_limit=workers))
    from flows.pool.worker import train_chain as importable  # workers import it by path

    entry = "flows/pool/worker.py:train_chain"
    importable.from_source(source=source or str(ROOT), entrypoint=entry).deploy(
        name=pool, work_pool_name=pool, build=False, push=False, print_next_steps=False,
        ignore_warnings=True, tags=["nmm", "pool"],
    )  # fmt: skip
    name = f"nmm: crash zombie flow runs ({pool})"
    try:
        Automation.read(name=name)
    except (ValueError, ObjectNotFound):
        Automation(
            name=name,
            trigger=EventTrigger(
                after={"prefect.flow-run.heartbeat"},
                expect={
                    "prefect.flow-run.heartbeat",
                    "prefect.flow-run.Completed",
                    "prefect.flow-run.Failed",
                    "prefect.flow-run.Cancelled",
                    "prefect.flow-run.Crashed",
                },  # fmt: skip
                match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
                for_each={"prefect.resource.id"},
                posture=Posture.Proactive,
                threshold=1,
                within=timedelta(seconds=zombie_after),
            ),
            actions=[
                ChangeFlowRunState(
                    state=StateType.CRASHED, force=True, message="no heartbeat: its worker died"
                )
            ],  # fmt: skip
        ).create()
    print(f"work pool {pool!r} (at most {workers} runs at once), deployment "
          f"{deployment_name(pool)!r}, zombie runs crashed after {zombie_after:g} s")  # fmt: skip


def worker_command(pool: str, name: str) -> list[str]:
    prefect = Path(sys.executable).parent / "prefect"
    return [str(prefect), "worker", "start", "--pool", pool, "--type", "process", "--limit", "1",
            "--name", name]  # fmt: skip


def worker_env(name: str, gpu: str | None, heartbeat: int = HEARTBEAT_S) -> dict[str, str]:
    env = dict(os.environ, NMM_WORKER=name, PREFECT_FLOWS_HEARTBEAT_FREQUENCY=str(heartbeat))
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    return env


def up(pool: str, n: int) -> int:
    """The pool, its deployment and ``n`` workers on this machine (one per GPU if it has as many,
    else CPU slots), until Ctrl-C, SIGTERM or SIGHUP, which stop the workers too."""
    deploy(pool, n, None, ZOMBIE_AFTER_S)
    import torch

    gpus = torch.cuda.device_count()
    procs = []
    with stop_on_signals():
        try:
            for i in range(n):
                name = f"{os.uname().nodename}-{i}"
                gpu = str(i) if gpus >= n else None
                procs.append(subprocess.Popen(worker_command(pool, name), env=worker_env(name, gpu),
                                              preexec_fn=die_with_parent))  # fmt: skip
            print(f"{n} worker(s) on pool {pool!r}: set grid.work_pool: {pool} in params.yaml and "
                  "run the grid (with PREFECT_API_URL set, and MLFLOW_TRACKING_URI at an MLflow "
                  "server: `make ui` starts both); Ctrl-C stops the workers", flush=True)  # fmt: skip
            for p in procs:
                p.wait()
        except KeyboardInterrupt:
            pass
        finally:
            for p in procs:
                if p.poll() is None:
                    p.terminate()
            for p in procs:
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
    return 0
