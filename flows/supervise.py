"""Process supervision: one grid point runs in its own process, watched until it ends.

:func:`train_process` starts the point's process (its output appended to
``results/points/<id>/train.log``), samples the process tree's CPU and memory twice a second,
streams the point's new metrics and those samples to its MLflow run every few seconds, and
returns the point's record. A process that ends without a record (non-zero exit, a signal)
raises :class:`PointCrashed` with the last lines of its log; the grid task retries it, and the
point resumes from its checkpoints. On Linux the child dies with the grid process
(``PR_SET_PDEATHSIG``), so no orphan trains on to race a relaunch for the same checkpoints.

On Linux a point's process is forked from a server that has imported the training code, torch
and torch._dynamo once (multiprocessing's forkserver, started at the first point): a fresh
``python -m flows.train`` spends ~3.5 s per point importing them. Each point still gets its own
process (its memory, its crash, its kill -9). The server is used only while the training code
the launch planned with is the code it imported (:func:`_server`); otherwise, and off Linux, each point runs
``python -m flows.train`` (the same ``main``).
"""

from __future__ import annotations

import contextlib
import functools
import multiprocessing
import os
import runpy
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil

from flows import records
from flows.devices import cpu_kernel_env
from flows.launch import Launch
from flows.plan import Job
from stages.common.paths import ROOT
from stages.common.processes import die_with_parent

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


# imported once by the fork server: everything a point imports (torch._dynamo: AdamW's first
# construction imports it, ~1.4 s)
PRELOAD = ["flows.train", "torch._dynamo"]
RUNPY_QUIET = "ignore::RuntimeWarning:runpy"
_started: dict[str, str] = {}  # "code": the hash of the training code the server imported


def _server(code: str) -> multiprocessing.context.BaseContext | None:
    """The fork-server context while it runs ``code`` (the hash of the training code a launch
    planned with), else None: the code changed since this process started the server (a
    long-lived process, a test session), so each point gets a fresh process."""
    if sys.platform != "linux":
        return None
    if _started.setdefault("code", code) != code:
        return None
    ctx = multiprocessing.get_context("forkserver")
    # the server starts with this process's environment and imports torch before any point's
    # own environment applies: the CPU kernels are pinned in it first (flows/devices.py)
    os.environ.update(cpu_kernel_env())
    # a child also runs this process's main module as __mp_main__ (multiprocessing's rule);
    # for ``python -m flows.grid`` that imports Prefect (~1.9 s per point) unless preloaded
    main = getattr(sys.modules["__main__"].__spec__, "name", None)
    ctx.set_forkserver_preload(PRELOAD + ([main] if main else []))  # (once: at the first start)
    # runpy warns that a preloaded module "found in sys.modules" is run again (the main module
    # above, the point's module in _forked): on purpose. The server takes this process's -W
    # options, its children the server's filters.
    if RUNPY_QUIET not in sys.warnoptions:
        sys.warnoptions.append(RUNPY_QUIET)
    return ctx


def _forked(module: str, argv: list[str], env: dict[str, str], log_path: str) -> None:
    """In a process forked from the server: ``python -m module *argv`` with ``env``, its output
    appended to ``log_path`` (the module's imports are loaded already)."""
    with contextlib.suppress(Exception):  # Linux: named in ps/top; dies with the server
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(15, b"nmm-point", 0, 0, 0)  # PR_SET_NAME
    die_with_parent(signal.SIGKILL)  # (the server dies with the grid)
    os.environ.clear()
    os.environ.update(env)
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout.reconfigure(line_buffering=True)  # a kill loses no finished line
    sys.argv = [module, *argv]
    runpy.run_module(module, run_name="__main__", alter_sys=True)  # exits via sys.exit


class _Child:
    """A point's process: forked from the server (Linux) or ``python -m flows.train``."""

    def __init__(self, job: Job, launch: Launch, gpu: str | None, log_path: Path):
        cmd, env = launch.command(job), launch.env(gpu)
        torchrun = cmd[2] != "flows.train"  # several processes: a fresh torchrun each
        ctx = None if torchrun else _server(launch.fingerprints.all_code)
        self.popen: subprocess.Popen | None = None
        if ctx is not None:
            assert cmd[1] == "-m"  # [python, -m, module, args...]: run the same in the fork
            args = (cmd[2], cmd[3:], env, str(log_path))
            self.proc = ctx.Process(target=_forked, args=args, name=job.label)
            self.proc.start()
            self.pid = self.proc.pid
            return
        with log_path.open("a") as log_file:
            self.popen = subprocess.Popen(
                cmd,
                cwd=ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                preexec_fn=functools.partial(die_with_parent, signal.SIGKILL),
                start_new_session=torchrun,
            )
        self.pid = self.popen.pid
        self.group = torchrun

    def wait(self, timeout: float) -> int | None:
        """The exit code (negative: the signal) once ended, else None after ``timeout``."""
        if self.popen is not None:
            try:
                return self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                return None
        self.proc.join(timeout)
        return self.proc.exitcode

    def kill(self) -> None:
        if self.wait(0) is None:
            if self.popen is not None and self.group:  # torchrun and its ranks (own sessions)
                tree = [psutil.Process(self.popen.pid)]
                with contextlib.suppress(psutil.NoSuchProcess):
                    tree += tree[0].children(recursive=True)
                for p in tree:
                    with contextlib.suppress(psutil.NoSuchProcess):
                        p.kill()
            elif self.popen is not None:
                self.popen.kill()
            else:
                self.proc.kill()
        self.wait(60)


def train_process(job: Job, launch: Launch, gpu: str | None) -> dict[str, Any]:
    """Run the point's process to its end, streaming its curve and system samples to MLflow.

    Returns ``{"record": ..., "system": {...}}``; raises :class:`PointCrashed` when the process
    ends without a record.
    """
    pdir = records.point_dir(launch.results, job.point_id)
    pdir.mkdir(parents=True, exist_ok=True)
    log_path, metrics_path = pdir / "train.log", pdir / "metrics.jsonl"
    with log_path.open("a") as log_file:
        log_file.write(f"=== {datetime.now().isoformat(timespec='seconds')} {job.label}\n")
    launch.write_config(job)
    proc = _Child(job, launch, gpu, log_path)
    ps = psutil.Process(proc.pid)
    t0 = last_log = last_t = time.monotonic()
    last_cpu, peak_rss, cpu_s, samples, mlflow_s = 0.0, 0.0, 0.0, [], 0.0
    try:
        while True:
            rc = proc.wait(POLL_S)
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
                launch.tracker.log_progress(job.point_id, metrics_path, samples)
                samples, last_log = [], time.monotonic()
                mlflow_s += last_log - now
            if rc is not None:
                break
    finally:
        proc.kill()  # if still running: the task was cancelled or the flow is going down
    if rc != 0:
        raise PointCrashed(f"{_describe_exit(rc)}; last lines of {log_path}:\n{_tail(log_path)}")
    record = records.read_record(launch.results, job.point_id)
    if record is None or record.get("point_id") != job.point_id:
        raise PointCrashed(f"the process ended (exit 0) without writing {pdir / 'record.json'}")
    system = {
        "peak_rss_megabytes": peak_rss / 2**20,
        "cpu_seconds": cpu_s,
        "process_seconds": time.monotonic() - t0,  # start to exit, as the grid saw it
        "mlflow_stream_seconds": mlflow_s,  # streaming its curve and samples to MLflow
    }
    return {"record": record, "system": system}
