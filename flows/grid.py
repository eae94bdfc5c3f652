"""The grid flow: train every point of params ``grid`` once, concurrently, and record it.

``python -m flows.grid run`` (what ``dvc repro`` runs) expands ``grid.archs x sizes x tokens x
mixtures x seeds`` (flows/train.py ``expand_grid``) and trains each point in its own process
(``python -m flows.train``, one pinned thread on CPU, one GPU each where there are GPUs), at
most ``grid.workers`` at once. The points of a group (same arch, size, mixture and seed) share
one constant-lr trunk, so they run one after another in ascending tokens; groups run
concurrently. A point whose ``results/points/<id>/record.json`` says ``ok`` for the same point
id (a hash of everything that changes its result) is never trained again: adding a size trains
that size only. A crashed point is retried ``grid.retries`` times (it resumes from its
checkpoints); a point that still fails, or whose loss went NaN or diverged, is recorded as
``failed`` with its reason and the grid goes on.

Records: ``results/runs.parquet`` (flows/records.py), rewritten after every finished point;
MLflow (flows/tracking.py): experiment ``nmm-<grid.study>``, a parent run per launch, one
child run per point (reused when a point is retried, resumed or launched again). Progress: a
tqdm bar (points done / total, ETA) and Prefect logs per point.

Prefect runs in its ephemeral mode unless ``PREFECT_API_URL`` points at a server, so nothing
has to be started first. ``python -m flows.grid serve`` registers a deployment
(``flow.serve``) so grids can be started and scheduled from the Prefect UI with parameters.
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Prefect reads its settings once, when it is imported: these defaults (STACK-NOTES) go first.
for _key, _value in {
    "PREFECT_HOME": str(ROOT / ".prefect"),
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "MLFLOW_DISABLE_TELEMETRY": "true",
}.items():
    os.environ.setdefault(_key, _value)

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections import deque  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from datetime import datetime  # noqa: E402
from typing import Any  # noqa: E402

import psutil  # noqa: E402
from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402
from prefect.context import FlowRunContext, TaskRunContext  # noqa: E402
from prefect.futures import PrefectFuture, as_completed  # noqa: E402
from prefect.types.entrypoint import EntrypointType  # noqa: E402
from prefect.utilities.annotations import quote  # noqa: E402
from tqdm import tqdm  # noqa: E402

from flows import records  # noqa: E402
from flows.tracking import Tracker, flatten  # noqa: E402
from flows.train import (  # noqa: E402
    ARCH_SPECS,
    Point,
    data_fingerprint,
    expand_grid,
    group_id,
    point_id,
)
from stages.params import Params, ParamsError, load_params  # noqa: E402

POLL_S = 0.5  # how often a point's process is checked and sampled
LOG_EVERY_S = 5.0  # how often its new metrics go to MLflow while it trains
LOG_TAIL = 20  # lines of a crashed point's train.log quoted in its error


class PointCrashed(RuntimeError):
    """The point's process ended without a record (non-zero exit, signal)."""


@dataclass(frozen=True)
class Job:
    point: Point
    point_id: str
    group_id: str

    @property
    def label(self) -> str:
        p = self.point
        return f"{p.arch}-{p.size}-D{p.tokens}-{p.mixture}-s{p.seed}"


@dataclass
class Launch:
    """What every point task of one launch shares (passed quoted: Prefect does not inspect it)."""

    params: Params
    params_path: Path
    shards: Path
    codebook: Path | None
    results: Path
    fingerprint: str
    tracker: Tracker
    fail_at_step: dict[str, int]

    def command(self, job: Job) -> list[str]:
        cmd = [sys.executable, "-m", "flows.train", "--point", json.dumps(job.point.to_dict())]
        cmd += ["--params", str(self.params_path), "--shards", str(self.shards)]
        cmd += ["--workdir", str(self.results)]
        # a missing codebook: flows.train sees no file, as the fingerprint here did
        cmd += ["--codebook", str(self.codebook or self.shards / "no-codebook.pt")]
        if job.point_id in self.fail_at_step:
            cmd += ["--fail-at-step", str(self.fail_at_step[job.point_id])]
        return cmd

    def env(self, gpu: str | None) -> dict[str, str]:
        threads = str(self.params.train.threads)
        env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
        env["PYTHONUNBUFFERED"] = "1"
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpu
        elif self.params.train.device == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""
        return env


# --------------------------------------------------------------------------- planning


def plan(params: Params, fingerprint: str) -> list[Job]:
    """Every point of the grid with its ids, in expand_grid's stable order."""
    return [
        Job(p, point_id(p, params, fingerprint), group_id(p, params, fingerprint))
        for p in expand_grid(params)
    ]


def chains(jobs: list[Job], shared_trunks: bool) -> list[deque[Job]]:
    """Jobs that must run one after another: a group's points in ascending tokens (they share
    the group's trunk checkpoints), or every point alone without cooldown branching."""
    if not shared_trunks:
        return [deque([j]) for j in jobs]
    groups: dict[str, list[Job]] = {}
    for j in jobs:
        groups.setdefault(j.group_id, []).append(j)
    return [deque(sorted(g, key=lambda j: j.point.tokens)) for g in groups.values()]


def device_slots(params: Params) -> list[str | None]:
    """One entry per point that may run at once: a GPU id each, or None (CPU)."""
    workers, device = params.grid.workers, params.train.device
    if device == "cpu":
        return [None] * workers
    import torch

    n = torch.cuda.device_count()
    if n == 0:
        if device == "cuda":
            raise ParamsError("train.device is 'cuda' but no GPU is visible")
        return [None] * workers
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [s.strip() for s in visible.split(",")] if visible else [str(i) for i in range(n)]
    return ids[: min(workers, n)]


# --------------------------------------------------------------------------- one point


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
    """Linux: the training process gets SIGKILL if the grid process dies (no orphan trains
    on, to race a relaunch for the same checkpoints)."""
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


def _point_tags(job: Job) -> dict[str, str]:
    p = job.point
    return {
        "arch": p.arch,
        "moe": str(ARCH_SPECS[p.arch]["moe"]).lower(),
        "size": p.size,
        "tokens": str(p.tokens),
        "mixture": p.mixture,
        "seed": str(p.seed),
        "group_id": job.group_id,
    }


def _point_params(job: Job, launch: Launch) -> dict[str, Any]:
    """Everything the point's result depends on, flattened (MLflow params)."""
    params = launch.params
    return flatten(
        {
            "point": job.point.to_dict(),
            "mixture": params.grid.mixtures[job.point.mixture].as_dict(),
            "model": params.model.model_dump(),
            "train": params.train.model_dump(),
            "data": {
                "context_length": params.data.context_length,
                "fingerprint": launch.fingerprint,
            },
        }
    )


@task(name="train-point", task_run_name="{label}", cache_policy=NO_CACHE, retry_delay_seconds=2)
def train_point_task(label: str, job: Job, launch: Launch, gpu: str | None) -> dict[str, Any]:
    """Train one point in its own process (retried from its checkpoints if it crashes)."""
    logger = get_run_logger()
    ctx = TaskRunContext.get()
    attempt = ctx.task_run.run_count if ctx else 1
    run_id = launch.tracker.start_point(
        label, job.point_id, _point_tags(job), _point_params(job, launch)
    )
    where = f"GPU {gpu}" if gpu is not None else f"CPU, {launch.params.train.threads} thread(s)"
    logger.info("%s (%s): start, attempt %d, on %s", label, job.point_id, attempt, where)
    out = train_process(job, launch, gpu, run_id)
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


# --------------------------------------------------------------------------- the flow


class Recorder:
    """The records of one launch: record.json, runs.parquet and the points' MLflow runs."""

    def __init__(self, jobs: list[Job], launch: Launch):
        self.jobs, self.launch = jobs, launch
        self.rows: dict[str, dict[str, Any]] = {}
        self.table = launch.results / "runs.parquet"

    def adopt(self, job: Job, rec: dict[str, Any]) -> None:
        """A point trained before: its row, and its MLflow run if this store lacks it (a new
        store) or it never ended (a grid killed between the point's end and its record)."""
        tracker = self.launch.tracker
        if tracker.needs_finish(job.point_id):
            tracker.start_point(
                job.label, job.point_id, _point_tags(job), _point_params(job, self.launch)
            )
            self.finish(job, rec, {})
            return
        row = {**rec, "mlflow_run_id": tracker.run_id(job.point_id)}
        if rec.get("mlflow_run_id") != row["mlflow_run_id"]:
            records.write_record(self.launch.results, job.point_id, row)
        self.rows[job.point_id] = row

    def finish(self, job: Job, rec: dict[str, Any], system: dict[str, float]) -> None:
        """A point that ended: record.json (+ its run id), its MLflow run ends, runs.parquet."""
        results, tracker = self.launch.results, self.launch.tracker
        run_id = tracker.run_id(job.point_id)
        rec = {**rec, "mlflow_run_id": run_id}
        records.write_record(results, job.point_id, rec)
        if run_id is not None:
            pdir = records.point_dir(results, job.point_id)
            artifacts = [pdir / "record.json", pdir / "train.log"]
            tracker.finish_point(run_id, rec, pdir / "metrics.jsonl", artifacts, system)
        self.rows[job.point_id] = rec
        self.write()

    def write(self) -> None:
        """runs.parquet: the finished points of the current grid, in grid order."""
        rows = [self.rows[j.point_id] for j in self.jobs if j.point_id in self.rows]
        records.write_table(rows, self.table)


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


def _outcome(job: Job, future: PrefectFuture, attempts: int) -> tuple[dict, dict]:
    """(record, system metrics) of a finished point task; a crash on every attempt is a
    failed record with its reason."""
    try:
        out = future.result()
        return out["record"], out["system"]
    except Exception as e:
        get_run_logger().error("%s: failed after %d attempt(s): %s", job.label, attempts, e)
        return records.crash_record(job.point.to_dict(), job.point_id, job.group_id, str(e)), {}


@contextlib.contextmanager
def _exclusive(results: Path) -> Iterator[None]:
    """One launch at a time per results directory (two would train the same checkpoints)."""
    import fcntl

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


def _resolve(path: str) -> Path:
    return Path(path).expanduser().resolve()


def _start_launch(launch: Launch, jobs: list[Job], todo: list[Job]) -> None:
    """The launch's parent run in MLflow, tagged with its Prefect flow run."""
    ctx = FlowRunContext.get()
    flow_run = ctx.flow_run if ctx else None
    launch.tracker.start_launch(
        name=f"launch-{datetime.now():%Y%m%d-%H%M%S}",
        params={
            "grid": launch.params.grid.model_dump(),
            "params_path": str(launch.params_path),
            "results": str(launch.results),
            "data_fingerprint": launch.fingerprint,
        },
        tags={
            "prefect.flow_run_id": str(flow_run.id) if flow_run else "",
            "prefect.flow_run_name": flow_run.name if flow_run else "",
            "points": str(len(jobs)),
            "to_train": str(len(todo)),
        },
        artifacts=[launch.params_path],
    )


@flow(name="nmm-grid")
def grid_flow(
    params_path: str = "params.yaml",
    shards: str = "data/shards",
    codebook: str = "data/codebook/codebook.pt",
    results: str = "results",
    tracking_uri: str | None = None,
    fail_at_step: dict[str, int] | None = None,
) -> dict[str, Any]:
    """Train every point of the grid in params.yaml that is not trained yet, and record it.

    Args:
        params_path: the study (params.yaml): sections grid, model, train, data.
        shards: the shards directory (stage shards).
        codebook: the visual codebook (stage codebook); needed by discrete archs only.
        results: where records (points/), trunks (groups/) and runs.parquet go.
        tracking_uri: MLflow store; default MLFLOW_TRACKING_URI, else sqlite:///<repo>/mlflow.db.
        fail_at_step: test hook: point id -> step at which that point's loss is forced to NaN.
    """
    logger = get_run_logger()
    t0 = time.monotonic()
    params_file = _resolve(params_path)
    params = load_params(params_file)
    shards_dir, results_dir, cb = _resolve(shards), _resolve(results), _resolve(codebook)
    cb = cb if cb.exists() else None
    fingerprint = data_fingerprint(shards_dir, cb)
    jobs = plan(params, fingerprint)
    slots = device_slots(params)

    with _exclusive(results_dir):
        tracker = Tracker(params.grid.study, tracking_uri)
        launch = Launch(
            params,
            params_file,
            shards_dir,
            cb,
            results_dir,
            fingerprint,
            tracker,
            fail_at_step or {},
        )
        done = {j.point_id: records.read_record(results_dir, j.point_id) for j in jobs}
        done = {pid: rec for pid, rec in done.items() if records.is_done(rec)}
        todo = [j for j in jobs if j.point_id not in done]
        ready = deque(chains(todo, params.train.branch_cooldowns))
        _start_launch(launch, jobs, todo)
        logger.info(
            "grid '%s': %d points, %d already trained, %d to train in %d chain(s), %d at once "
            "on %s; MLflow %s, experiment %s",
            params.grid.study,
            len(jobs),
            len(done),
            len(todo),
            len(ready),
            len(slots),
            "CPU" if slots[0] is None else "GPUs " + ",".join(map(str, slots)),
            tracker.uri,
            tracker.experiment,
        )
        recorder = Recorder(jobs, launch)
        for job in jobs:
            if job.point_id in done:
                recorder.adopt(job, done[job.point_id])
        recorder.write()

        task_ = train_point_task.with_options(retries=params.grid.retries)

        def submit(job: Job, slot: str | None) -> PrefectFuture:
            return task_.submit(job.label, quote(job), quote(launch), slot)

        trained = failed = 0
        bar = tqdm(total=len(jobs), initial=len(done), desc="grid", unit="point")
        ok = False
        try:
            for job, future in run_chains(ready, slots, submit):
                rec, system = _outcome(job, future, 1 + params.grid.retries)
                recorder.finish(job, rec, system)
                trained += 1
                failed += rec.get("status") != "ok"
                bar.update(1)
                bar.set_postfix(failed=failed)
            ok = True
        finally:
            bar.close()
            summary = {
                "points": len(jobs),
                "skipped": len(done),
                "trained": trained,
                "ok": sum(r.get("status") == "ok" for r in recorder.rows.values()),
                "failed": failed,
                "wall_s": round(time.monotonic() - t0, 3),
            }
            metrics = {f"launch/{k}": float(v) for k, v in summary.items()}
            tracker.end_launch(metrics, [recorder.table], ok)
    if failed:
        logger.warning("%d point(s) failed: see the 'error' column of %s", failed, recorder.table)
    logger.info("grid done: %s", summary)
    return {
        **summary,
        "runs": str(recorder.table),
        "tracking_uri": tracker.uri,
        "experiment": tracker.experiment,
        "parent_run_id": tracker.parent_id,
    }


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m flows.grid",
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = ap.add_subparsers(dest="command", required=True)
    paths = argparse.ArgumentParser(add_help=False)
    paths.add_argument("--params", default="params.yaml", help="the study (default %(default)s)")
    paths.add_argument("--shards", default="data/shards", help="(default %(default)s)")
    paths.add_argument(
        "--codebook", default="data/codebook/codebook.pt", help="(default %(default)s)"
    )
    paths.add_argument("--results", default="results", help="(default %(default)s)")
    paths.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite:///<repo>/mlflow.db)",
    )
    run = sub.add_parser(
        "run",
        parents=[paths],
        help="train the grid now (ephemeral Prefect unless PREFECT_API_URL is set)",
    )
    run.add_argument(
        "--strict", action="store_true", help="exit 1 if any point failed (default: exit 0)"
    )
    serve = sub.add_parser(
        "serve",
        parents=[paths],
        help="register a deployment and serve it: start and schedule grids from the Prefect UI",
        description="Serve the grid flow as a deployment (flow.serve). Start a server first "
        "(`prefect server start --host 127.0.0.1`) and export PREFECT_API_URL="
        "http://127.0.0.1:4200/api, then start runs (with parameters) from the UI. The path "
        "options set the deployment's default parameters; runs execute in this process's "
        "working directory.",
    )
    serve.add_argument("--name", default="grid", help="deployment name (default %(default)s)")
    when = serve.add_mutually_exclusive_group()
    when.add_argument("--cron", help="schedule, e.g. '0 3 * * *'")
    when.add_argument("--interval", type=float, help="schedule: every this many seconds")
    args = ap.parse_args(argv)

    try:
        load_params(args.params)  # fail before Prefect starts, with the key that is wrong
    except ParamsError as e:
        print(e, file=sys.stderr)
        return 2
    kwargs = {
        "params_path": args.params,
        "shards": args.shards,
        "codebook": args.codebook,
        "results": args.results,
        "tracking_uri": args.tracking_uri,
    }
    if args.command == "serve":
        from flows.grid import grid_flow as importable  # not __main__: runs import it by name

        importable.serve(
            name=args.name,
            parameters=kwargs,
            cron=args.cron,
            interval=args.interval,
            tags=["nmm", "grid"],
            entrypoint_type=EntrypointType.MODULE_PATH,
        )
        return 0
    summary = grid_flow(**kwargs)
    return 1 if args.strict and summary["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
