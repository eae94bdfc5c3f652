"""Process supervision: one grid point runs in its own process, watched until it ends.

:func:`train_process` starts ``python -m flows.train`` for a point (its output appended to
``results/points/<id>/train.log``), samples the process tree's CPU and memory twice a second,
streams the point's new metrics and those samples to its MLflow run every few seconds, and
returns the point's record. A process that ends without a record (non-zero exit, a signal)
raises :class:`PointCrashed` with the last lines of its log; the grid task retries it, and the
point resumes from its checkpoints. On Linux the child dies with the grid process
(``PR_SET_PDEATHSIG``), so no orphan trains on to race a relaunch for the same checkpoints.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil

from flows import records
from flows.launch import ROOT, Launch
from flows.plan import Job

POLL_S = 0.5  # how often a point's process is checked and sampled
LOG_EVERY_S = 5.0  # how often its new metrics go to MLflow while it trains
LOG_TAIL = 20  # lines of a crashed point's train.log quoted in its error


class PointCrashed(RuntimeError):
    """The point's process ended without a record (non-zero exit, signal)."""


def _tree(proc: psutil.Process) -> tuple[float, float]:
    """RSS (bytes) and CPU seconds of a process and its children."""
    rss = cpu = 0.0
    with contextlib.suppress(psutil.Error):
        for p in [proc, *proc.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                rss += p.memory_info().rss
                t = p.cpu_times()
                cpu += t.user + t.system
    return rss, cpu


def _describe_exit(rc: int) -> str:
    if rc < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-rc).name}"
    return f"exit code {rc}"


def _tail(path: Path, n: int = LOG_TAIL) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except FileNotFoundError:
        return ""


def _die_with_parent() -> None:  # pragma: no cover (runs in the child)
    """Linux: the training process gets SIGKILL if the grid process dies."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def train_process(job: Job, launch: Launch, gpu: str | None, run_id: str) -> dict[str, Any]:
    """Run the point's process to its end, streaming its curve and system samples to MLflow.

    Returns ``{"record": ..., "system": {...}}``; raises :class:`PointCrashed` when the process
    ends without a record.
    """
    pdir = records.point_dir(launch.results, job.point_id)
    pdir.mkdir(parents=True, exist_ok=True)
    log_path, metrics_path = pdir / "train.log", pdir / "metrics.jsonl"
    with log_path.open("a") as log_file:
        log_file.write(f"=== {datetime.now().isoformat(timespec='seconds')} {job.label}\n")
        log_file.flush()
        proc = subprocess.Popen(
            launch.command(job),
            cwd=ROOT,
            env=launch.env(gpu),
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
    ps = psutil.Process(proc.pid)
    t0 = last_log = last_t = time.monotonic()
    last_cpu, peak_rss, cpu_s, samples = 0.0, 0.0, 0.0, []
    try:
        while True:
            try:
                rc: int | None = proc.wait(timeout=POLL_S)
            except subprocess.TimeoutExpired:
                rc = None
            now = time.monotonic()
            if rc is None:  # sample the process tree (MLflow's system metrics, per point)
                rss, cpu_s = _tree(ps)
                peak_rss = max(peak_rss, rss)
                sample = {"process_rss_megabytes": rss / 2**20}
                if cpu_s >= last_cpu:
                    busy = (cpu_s - last_cpu) / max(now - last_t, 1e-3)
                    sample["cpu_utilization_percentage"] = 100 * busy
                last_cpu, last_t = cpu_s, now
                samples.append((int(time.time() * 1000), int(now - t0), sample))
            if rc is not None or now - last_log >= LOG_EVERY_S:
                launch.tracker.log_progress(run_id, metrics_path, samples)
                samples, last_log = [], now
            if rc is not None:
                break
    finally:
        if proc.poll() is None:  # the task was cancelled or the flow is going down
            proc.kill()
            proc.wait()
    if rc != 0:
        raise PointCrashed(f"{_describe_exit(rc)}; last lines of {log_path}:\n{_tail(log_path)}")
    record = records.read_record(launch.results, job.point_id)
    if record is None or record.get("point_id") != job.point_id:
        raise PointCrashed(f"the process ended (exit 0) without writing {pdir / 'record.json'}")
    system = {"peak_rss_megabytes": peak_rss / 2**20, "cpu_seconds": cpu_s}
    return {"record": record, "system": system}
