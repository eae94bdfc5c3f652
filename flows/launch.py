"""One launch of the grid: what its points share, its lock, and its records.

A :class:`Launch` is what every point task of one grid run shares: the validated params, the
paths, the fingerprints of data and code, the git revision and the MLflow tracker. It builds
each point's command line and environment. :class:`Recorder` keeps the launch's records in step:
``record.json`` per point, ``runs.parquet`` for the current grid, and the points' MLflow runs.
:func:`exclusive` lets one launch at a time use a results directory. Nothing here imports
Prefect.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flows import records
from flows.devices import cpu_kernel_env
from flows.plan import Fingerprints, Job
from flows.tracking import Tracker
from model.archs import variant
from stages.common.mlflow_store import flatten
from stages.common.stage import atomic_write
from stages.params import Params


def torchrun(
    procs: int, nodes: int = 1, endpoint: str | None = None, run_id: str = ""
) -> list[str]:
    """The launcher of one point over ``procs`` ranks in all, before ``-m flows.train ...``:
    on this machine (``--standalone``), or over ``nodes`` machines with ``procs / nodes`` ranks
    each, which meet by c10d rendezvous at ``endpoint`` (host:port of a machine they all reach,
    e.g. the first node of a Slurm job) under ``run_id`` (the point's id): the same command on
    every node, in any order. Rank 0 writes the point's files, so ``--workdir`` must be one
    shared filesystem for all nodes."""
    cmd = [sys.executable, "-m", "torch.distributed.run"]
    if nodes == 1 and endpoint is None:
        return [*cmd, "--standalone", f"--nproc-per-node={procs}"]
    if procs % nodes or endpoint is None:
        raise ValueError(
            f"{procs} processes over {nodes} nodes at {endpoint}: give a rendezvous endpoint "
            "(host:port) and processes that split evenly over the nodes"
        )
    return [*cmd, f"--nnodes={nodes}", f"--nproc-per-node={procs // nodes}",
            "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", f"--rdzv-id={run_id or 'nmm'}"]  # fmt: skip


@dataclass
class Launch:
    """What every point task of one launch shares (passed quoted: Prefect does not inspect it)."""

    params: Params
    params_path: Path | None  # the study's file (None: params sent to a pool worker)
    shards: Path
    codebook: Path | None
    results: Path
    fingerprints: Fingerprints
    git_revision: str
    tracker: Tracker

    def command(self, job: Job) -> list[str]:
        """The point's process: ``python -m flows.train`` on its run config (written by
        :meth:`write_config`), or torchrun over ``train.processes`` of them."""
        cmd = [sys.executable, "-m", "flows.train"]
        procs = job.config.processes
        if procs > 1:  # one point over several processes: torchrun (flows/training/dist.py)
            cmd = [*torchrun(procs), *cmd[1:]]
        cmd += ["--config", str(records.config_path(self.results, job.point_id))]
        cmd += ["--shards", str(self.shards), "--workdir", str(self.results)]
        cmd += ["--point-id", job.point_id]
        # a missing codebook: flows.train sees no file, as the fingerprint here did
        cmd += ["--codebook", str(self.codebook or Path(self.results) / "no-codebook.pt")]
        return cmd

    def write_config(self, job: Job) -> None:
        """The point's run config, beside its record: what its process reads."""
        atomic_write(records.config_path(self.results, job.point_id), job.config.to_json())

    def env(self, gpu: str | None) -> dict[str, str]:
        threads = str(self.params.train.threads)
        env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
        env.update(cpu_kernel_env(env))  # the same kernels on every x86 CPU (flows/devices.py)
        env["PYTHONUNBUFFERED"] = "1"
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpu
        elif self.params.train.device == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""
        return env

    def point_tags(self, job: Job) -> dict[str, str]:
        p = job.point
        return {
            "arch": p.arch,
            "moe": str(variant(p.arch).moe).lower(),
            "size": p.size,
            "tokens": str(p.tokens),
            "mixture": p.mixture,
            "seed": str(p.seed),
            **({"experts": str(p.experts)} if p.experts is not None else {}),
            # the pool worker that trains it (flows/pool/)
            **({"worker": os.environ["NMM_WORKER"]} if os.environ.get("NMM_WORKER") else {}),
            "group_id": job.group_id,
            "code_fingerprint": job.code,
            "git_revision": self.git_revision,
        }

    def point_params(self, job: Job) -> dict[str, Any]:
        """Everything the point's result depends on, flattened (MLflow params): its run config
        and the fingerprints of its data."""
        return flatten({**job.config.to_dict(), "data": self.fingerprints.data_for(job.point.arch)})


class Recorder:
    """The records of one launch: record.json, runs.parquet and the points' MLflow runs."""

    def __init__(self, jobs: list[Job], launch: Launch, table: bool = True):
        """``table``: keep runs.parquet (not on a pool worker: the grid flow writes it from
        MLflow)."""
        self.jobs, self.launch = jobs, launch
        self.rows: dict[str, dict[str, Any]] = {}
        self.table = launch.results / "runs.parquet"
        self.keep_table = table

    def start(self, job: Job) -> str | None:
        """The point's MLflow run (created once, reused by retries and later launches); None
        while the server is unreachable (flows/tracking.py: made later)."""
        launch = self.launch
        return launch.tracker.start_point(
            job.label, job.point_id, launch.point_tags(job), launch.point_params(job)
        )

    def adopt(self, job: Job, rec: dict[str, Any]) -> None:
        """A point trained before: its row, and its MLflow run if this store lacks it (a new
        store) or it never ended (a grid killed between the point's end and its record)."""
        tracker = self.launch.tracker
        if tracker.needs_finish(job.point_id):
            self.start(job)
            self.finish(job, rec, {})
            return
        row = {**rec, "mlflow_run_id": tracker.run_id(job.point_id)}
        if row != rec:
            records.write_record(self.launch.results, job.point_id, row)
        self.rows[job.point_id] = row

    def finish(self, job: Job, rec: dict[str, Any], system: dict[str, float]) -> None:
        """A point that ended: record.json (+ its run id), its MLflow run ends, runs.parquet."""
        results, tracker = self.launch.results, self.launch.tracker
        run_id = tracker.run_id(job.point_id)
        rec = {**rec, "mlflow_run_id": run_id}
        for key in ("process", "mlflow_start", "mlflow_stream"):  # the grid's side of it
            if f"{key}_seconds" in system:
                rec[f"time_{key}_s"] = system[f"{key}_seconds"]
        records.write_record(results, job.point_id, rec)
        pdir = records.point_dir(results, job.point_id)
        artifacts = [pdir / "record.json", pdir / "train.log"]
        tracker.finish_point(job.point_id, rec, pdir / "metrics.jsonl", artifacts, system)
        self.rows[job.point_id] = rec
        self.write()

    def drain(self) -> list[str]:
        """Wait (up to ``grid.tracking_wait_s``) for the MLflow calls kept while the server
        was unreachable; then the records of points whose run was created late get its id.
        Returns the point ids still waiting."""
        tracker = self.launch.tracker
        left = tracker.drain(self.launch.params.grid.tracking_wait_s)
        for pid, row in self.rows.items():
            if row.get("mlflow_run_id") is None and (run_id := tracker.run_id(pid)) is not None:
                self.rows[pid] = {**row, "mlflow_run_id": run_id}
                records.write_record(self.launch.results, pid, self.rows[pid])
        self.write()
        return left

    def write(self) -> None:
        """runs.parquet: the finished points of the current grid, in grid order."""
        if not self.keep_table:
            return
        rows = [self.rows[j.point_id] for j in self.jobs if j.point_id in self.rows]
        records.write_table(rows, self.table)


@contextlib.contextmanager
def exclusive(results: Path) -> Iterator[None]:
    """One launch at a time per results directory (two would train the same checkpoints)."""
    groups = results / "groups"  # the trunks' checkpoints: a DVC out, not cached, not in git
    groups.mkdir(parents=True, exist_ok=True)
    if not (groups / ".gitignore").exists():
        (groups / ".gitignore").write_text("# checkpoints of the grid's trunks: never in git\n*\n")
    with (groups / ".grid.lock").open("w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"another grid launch is running on {results}") from None
        yield
