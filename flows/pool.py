"""Points over many machines: the grid's chains as flow runs on a Prefect work pool.

With ``grid.work_pool: <pool>`` in params.yaml, ``python -m flows.grid run`` trains nothing in
its own process. The grid flow submits each *chain* of the plan (the points of a group, which
share one constant-lr trunk, in ascending tokens) as a flow run of the deployment
``train-chain/<pool>``, and the workers polling the pool, on any machine, run them.

**Why a chain, not a point, is the unit of work.** A group's cooldowns branch from its trunk's
checkpoints (hundreds of MB for a real model, written every few hundred steps). Keeping a group
on one worker keeps them on that worker's disk, with no shared storage to set up or to wait on;
the groups, which are the many, spread over the workers. A chain that is submitted again after
its worker died resumes its unfinished point from the checkpoints when it lands on the same
machine (or a shared disk), and retrains it from the start elsewhere: either way the result is
the same (a point's numbers depend only on its id: flows/plan.py).

**The grid flow (the parent)**, :func:`run_on_pool`:

- submits with ``run_deployment(..., timeout=0, idempotency_key="<study>/<chain>/<attempt>")``:
  a parent started again reattaches to the children still running instead of starting a second
  copy of them;
- polls its children and checks every final state: a chain that *Crashed* (its worker died; the
  zombie automation :func:`deploy` creates marks a run whose heartbeats stop as Crashed) is
  submitted again with the next attempt, at most ``grid.retries`` times (Prefect's retries do not
  cover crashes, prefect#10211); a *Failed* chain (it raised: other code or data on the worker)
  is reported with its message;
- cancels its running children when it is cancelled (its own state turns Cancelling) or
  interrupted (cancelling a parent does not cancel children started with ``timeout=0``,
  prefect#12864);
- reads the results back from MLflow: the workers record each point there (its run, curve,
  record.json artifact), never in a shared file, and the parent writes runs.parquet from the store
  (flows/collect.py).

**The workers**: ``python -m flows.pool worker --pool P [--name W] [--gpu I]`` is ``prefect worker
start --type process --limit 1`` with the device pinned (``CUDA_VISIBLE_DEVICES``; one worker per
GPU, or per CPU slot) and flow-run heartbeats on. ``python -m flows.pool deploy --pool P
--workers N`` creates the process pool with a concurrency limit of N, the deployment and the
zombie automation; ``make pool WORKERS=N`` does all of it on this machine. Every machine needs
the same code and data (a checkout at the same commit, ``dvc pull``): a worker whose code or data
give other point ids refuses the chain (its flow run fails, naming the points).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import subprocess
import sys
import time
from collections import deque
from datetime import timedelta
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.context import FlowRunContext

from flows import records
from flows.launch import ROOT, Launch, Recorder
from flows.plan import CODE, Job, fingerprints, plan
from flows.tasks import crash_record, resolve, train_point_task
from flows.tracking import Tracker
from stages.common.provenance import git_revision
from stages.common.stage import atomic_write
from stages.params import validate_params

FLOW = "train-chain"
HEARTBEAT_S = 30  # flow-run heartbeats of the workers' runs (Prefect's minimum)
ZOMBIE_AFTER_S = 90  # a run whose heartbeats stopped this long ago is marked Crashed
POLL_S = 2.0
PAGE = 200  # flow runs per read (the server's cap)
LIVE = {"SCHEDULED", "PENDING", "RUNNING", "PAUSED"}  # a run to wait for, not to replace
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def deployment_name(pool: str) -> str:
    return f"{FLOW}/{pool}"


# --------------------------------------------------------------------------- the worker side


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
    text = json.dumps(params, sort_keys=True)
    params_file = (
        results_dir / "pool" / f"params-{hashlib.sha256(text.encode()).hexdigest()[:12]}.json"
    )
    atomic_write(params_file, text)  # the point processes read the study from here (JSON is YAML)
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
    launch = Launch(p, params_file, resolve(shards), cb, results_dir, fp, rev, tracker)
    recorder = Recorder(jobs, launch, table=False)
    ok = 0
    for job in jobs:
        rec = records.read_record(results_dir, job.point_id)
        if records.is_done(rec):  # trained by an earlier attempt on this machine
            recorder.adopt(job, rec)
        else:
            try:
                task_ = train_point_task.with_options(retries=p.grid.retries)
                out = task_(job.label, job, recorder, None)  # (its GPUs: the worker's env)
                rec, system = out["record"], out["system"]
            except Exception as e:
                logger.error("%s: failed: %s", job.label, e)
                rec, system = crash_record(job, e), {}
            recorder.finish(job, rec, system)
        ok += rec.get("status") == "ok"
    logger.info("%s: %d/%d points ok on worker %s", label, ok, len(jobs), worker_name())
    return {"points": len(jobs), "ok": ok, "worker": worker_name()}


# --------------------------------------------------------------------------- the parent side


def chain_key(chain: deque[Job] | list[Job]) -> str:
    return hashlib.sha256(" ".join(j.point_id for j in chain).encode()).hexdigest()[:16]


def run_on_pool(
    chains_: list[deque[Job]],
    launch: Launch,
    pool: str,
    paths: dict[str, str | None],
    on_done=None,
) -> dict[str, dict[str, Any]]:
    """Run ``chains_`` as flow runs of ``train-chain/<pool>`` and wait for every one to end.

    Returns per chain key: the final state type, the attempts used and the state's message.
    ``on_done(chain, state)`` is called when a chain ends for good.
    """
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    logger = get_run_logger()
    params = json.loads(launch.params.model_dump_json())
    study, retries = launch.params.grid.study, launch.params.grid.retries
    ctx = FlowRunContext.get()
    parent = ctx.flow_run.id if ctx else None
    number: dict[str, int] = {}  # chain key -> last idempotency-key attempt number
    tries: dict[str, int] = {}  # chain key -> submissions by this launch
    running: dict[Any, deque[Job]] = {}  # flow run id -> chain
    outcome: dict[str, dict[str, Any]] = {}

    def submit(chain: deque[Job]) -> None:
        key = chain_key(chain)
        while True:
            number[key] = number.get(key, 0) + 1
            name = f"{chain[0].label}+{len(chain) - 1}#{number[key]}"
            fr = run_deployment(
                name=deployment_name(pool),
                parameters={"label": name, "point_ids": [j.point_id for j in chain],
                            "params": params, "launch_run_id": launch.tracker.parent_id,
                            **paths},
                timeout=0,
                idempotency_key=f"{study}/{key}/{number[key]}",
                flow_run_name=name,
            )  # fmt: skip
            state = fr.state.type.value if fr.state else "SCHEDULED"
            if state in LIVE:  # new, or an earlier launch's attempt still going: wait for it
                break
            # an earlier launch's attempt that ended (its points are not all ok in MLflow, or
            # the chain would not be submitted) or is being cancelled: the next number
        tries[key] = tries.get(key, 0) + 1
        running[fr.id] = chain
        logger.info("chain %s: flow run %s (%s)", chain[0].label, name, state.lower())

    from prefect.exceptions import ObjectNotFound

    try:
        for chain in chains_:
            submit(chain)
    except ObjectNotFound:
        cancel(list(running))
        raise RuntimeError(
            f"grid.work_pool is {pool!r} but the server has no deployment "
            f"{deployment_name(pool)!r}: create it with `python -m flows.pool deploy --pool {pool}` "
            "and start workers (`python -m flows.pool worker --pool ...`)"
        ) from None
    try:
        with get_client(sync_client=True) as client:
            while running:
                if parent is not None:
                    me = client.read_flow_run(parent)
                    if me.state is not None and me.state.type.value in ("CANCELLING", "CANCELLED"):
                        raise KeyboardInterrupt("the grid flow run was cancelled")
                for fr in read_runs(client, list(running)):
                    state = fr.state.type.value if fr.state else "SCHEDULED"
                    if state not in TERMINAL:
                        continue
                    chain = running.pop(fr.id)
                    key = chain_key(chain)
                    msg = fr.state.message or ""
                    if state == "CRASHED" and tries[key] <= retries:
                        logger.warning(
                            "chain %s crashed (%s): submitted again", chain[0].label, msg
                        )
                        submit(chain)
                        continue
                    outcome[key] = {"state": state, "attempts": tries[key], "message": msg}
                    if state != "COMPLETED":
                        logger.error("chain %s ended %s after %d attempt(s): %s",
                                     chain[0].label, state, tries[key], msg)  # fmt: skip
                    if on_done is not None:
                        on_done(chain, outcome[key])
                if running:
                    time.sleep(POLL_S)
    except BaseException:
        with contextlib.suppress(Exception):  # (the error that stopped the grid is what counts)
            stopped = cancel(list(running))
            logger.warning("the grid stopped: %d chain(s) cancelled", len(stopped))
        raise
    return outcome


def cancel(flow_run_ids: list) -> list:
    """Stop these flow runs: each is proposed Cancelling (unforced), which Prefect turns into
    Cancelled for a run no worker has started and which the worker of a started one acts on by
    killing its processes. Returns the ids whose proposal was accepted."""
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelling

    stopped = []
    with get_client(sync_client=True) as client:
        for fid in flow_run_ids:
            with contextlib.suppress(Exception):  # ended meanwhile, or the server is gone
                r = client.set_flow_run_state(fid, Cancelling(message="the grid was cancelled"))
                if r.status.value == "ACCEPT" or r.state.type.value == "CANCELLED":
                    stopped.append(fid)
    return stopped


def read_runs(client, ids: list) -> list:
    """The flow runs ``ids`` (the server returns at most 200 a request: paged)."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    out = []
    for i in range(0, len(ids), PAGE):
        flow_filter = FlowRunFilter(id=FlowRunFilterId(any_=ids[i : i + PAGE]))
        out += client.read_flow_runs(flow_run_filter=flow_filter, limit=PAGE)
    return out


# --------------------------------------------------------------------------- set-up (CLI)


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
    from flows.pool import train_chain as importable  # not __main__: workers import it by path

    importable.from_source(source=source or str(ROOT), entrypoint="flows/pool.py:train_chain").deploy(
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
    else CPU slots), until Ctrl-C."""
    deploy(pool, n, None, ZOMBIE_AFTER_S)
    import torch

    gpus = torch.cuda.device_count()
    procs = []
    for i in range(n):
        name = f"{os.uname().nodename}-{i}"
        gpu = str(i) if gpus >= n else None
        procs.append(subprocess.Popen(worker_command(pool, name), env=worker_env(name, gpu)))
    print(f"{n} worker(s) on pool {pool!r}: set grid.work_pool: {pool} in params.yaml and run "
          "the grid (with PREFECT_API_URL set, and MLFLOW_TRACKING_URI at an MLflow server: "
          "`make ui` starts both); Ctrl-C stops the workers")  # fmt: skip
    try:
        for p in procs:
            p.wait()
    except KeyboardInterrupt:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait()
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m flows.pool",
        description="Run grid points on a Prefect work pool (flows/pool.py). Needs a Prefect "
        "server: export PREFECT_API_URL=http://HOST:4200/api.",
    )
    sub = ap.add_subparsers(dest="command", required=True)
    d = sub.add_parser("deploy", help="create the pool, the deployment and the zombie automation")
    d.add_argument("--pool", required=True)
    d.add_argument("--workers", type=int, default=2, help="at most this many runs at once")
    d.add_argument("--source", default=None,
                   help="where workers get the code: a git URL, or a path every machine has "
                   "(default: this checkout, %(default)s)")  # fmt: skip
    d.add_argument("--zombie-after", type=float, default=ZOMBIE_AFTER_S,
                   help="seconds without a heartbeat before a run is marked Crashed")  # fmt: skip
    w = sub.add_parser("worker", help="start one worker (runs one chain at a time)")
    w.add_argument("--pool", required=True)
    w.add_argument("--name", default=None, help="(default: host name + GPU)")
    w.add_argument("--gpu", default=None,
                   help="the GPU(s) this worker owns (CUDA_VISIBLE_DEVICES): one, or "
                   "train.processes of them for points over several processes, e.g. 0,1")  # fmt: skip
    w.add_argument("--heartbeat", type=int, default=HEARTBEAT_S, help="seconds (>= 30)")
    u = sub.add_parser("up", help="deploy, then run N workers here until Ctrl-C (make pool)")
    u.add_argument("--pool", default="local")
    u.add_argument("--workers", type=int, default=2)
    args = ap.parse_args(argv)
    if not os.environ.get("PREFECT_API_URL"):
        print("error: set PREFECT_API_URL to the Prefect server's API", file=sys.stderr)
        return 2
    if args.command == "deploy":
        deploy(args.pool, args.workers, args.source, args.zombie_after)
        return 0
    if args.command == "up":
        return up(args.pool, args.workers)
    name = args.name or os.uname().nodename + (f"-gpu{args.gpu}" if args.gpu else "")
    env = worker_env(name, args.gpu, args.heartbeat)
    os.execve(worker_command(args.pool, name)[0], worker_command(args.pool, name), env)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
