"""The grid's side of a work pool: submit each chain as a flow run, watch, resubmit, cancel.

:class:`PoolRunner` is the grid flow's runner (flows/grid/flow.py) for ``grid.work_pool``:

- it submits with ``run_deployment(..., timeout=0, idempotency_key="<study>/<chain>/<attempt>")``:
  a parent started again reattaches to the children still running instead of starting a second
  copy of them;
- it polls its children and checks every final state: a chain that *Crashed* (its worker died;
  the zombie automation of flows/pool/deploy.py marks a run whose heartbeats stop as Crashed) is
  submitted again with the next attempt, at most ``grid.retries`` times (Prefect's retries do
  not cover crashes, prefect#10211); a *Failed* chain (it raised: other code or data on the
  worker) is reported with its message;
- it cancels its running children when it is cancelled (its own state turns Cancelling) or
  interrupted (cancelling a parent does not cancel children started with ``timeout=0``,
  prefect#12864);
- done points and runs.parquet come from MLflow: the workers record each point there (its run,
  curve, record.json artifact), never in a shared file (flows/collect.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections import deque
from pathlib import Path
from typing import Any

from prefect import get_run_logger
from prefect.context import FlowRunContext
from tqdm import tqdm

from flows.collect import collect
from flows.launch import Launch
from flows.plan import Job
from flows.pool import deployment_name

POLL_S = 2.0
PAGE = 200  # flow runs per read (the server's cap)
LIVE = {"SCHEDULED", "PENDING", "RUNNING", "PAUSED"}  # a run to wait for, not to replace
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


class PoolRunner:
    """The grid flow's runner for chains trained by a work pool's workers."""

    def __init__(self, launch: Launch, pool: str, paths: dict[str, str]):
        self.launch, self.pool, self.paths = launch, pool, paths
        self.where = f"work pool {pool!r}"
        self.counts: dict[str, float] = {"chains": 0, "resubmitted": 0}
        self.study = launch.params.grid.study
        tracker = launch.tracker
        if tracker.uri.startswith(("sqlite:", "file:")):
            get_run_logger().warning(
                "MLflow store %s is a local file: workers on other machines cannot reach it "
                "(their points would be recorded elsewhere); give the grid an MLflow server "
                "(--tracking-uri http://..., make ui)", tracker.uri,
            )  # fmt: skip

    def done(self, jobs: list[Job]) -> set[str]:
        rows = collect(jobs, self.study, self.launch.tracker.uri).rows
        return {r["point_id"] for r in rows if r.get("status") == "ok"}

    def run(self, ready: deque[deque[Job]], progress: tqdm) -> None:
        self.counts["chains"] = len(ready)
        paths = {**self.paths, "tracking_uri": self.launch.tracker.uri}
        outcome = run_on_pool(list(ready), self.launch, self.pool, paths,
                              on_done=lambda chain, _: progress.update(len(chain)))  # fmt: skip
        self.counts["resubmitted"] = sum(o["attempts"] - 1 for o in outcome.values())

    def table(self, jobs: list[Job]) -> tuple[Path, list[dict[str, Any]], list[Job]]:
        table = self.launch.results / "runs.parquet"
        got = collect(jobs, self.study, self.launch.tracker.uri, table)
        return table, got.rows, got.missing


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
