"""MLflow records of a grid: one experiment per study, a run per launch, a run per point.

Layout (docs/grid.md):

- experiment ``nmm-<grid.study>``;
- a **launch run** per launch of the grid flow (tags ``nmm.kind=launch``, the Prefect flow
  run, the git revision; params: the ``grid`` section, the data fingerprint; metrics at the
  end: points total, skipped, trained, failed; artifacts: params.yaml and runs.parquet);
- a **point run** per grid point, found by its tag ``point_id`` before one is created, so a
  retried, resumed or re-launched point keeps its one run; tag ``nmm.launch``: the launch run
  that last trained it (flat, not nested: the UI folds nested runs under their parent).
  Params: its run config (flows/config.py: point, model, counts, schedule, optimizer, cadence)
  and the fingerprints of its data, then ``record.device`` and ``record.cpu_kernels``; tags:
  arch, moe, size, tokens, mixture, seed, point_id, group_id, code_fingerprint, git_revision,
  status (error);
  metrics: the curves of ``metrics.jsonl`` (step = optimizer step), ``final/<field>`` from the
  record, and ``system/*`` samples of the point's process tree (CPU %, RSS; peak RSS and CPU
  seconds at the end), which the UI shows in its System metrics tab.

Metric curves are logged incrementally while a point trains (the tag ``nmm.logged_step``
remembers how far), in batches (stages/common/mlflow_store.py). Every call goes through one
lock: grid tasks run in threads of one process, and SQLite wants one writer at a time.

A tracking server that cannot be reached (stopped, restarting, a network cut) does not stop
training: a call that fails for that reason is kept, per point (its run's start, its system
samples, its end), and the points train on; their curves wait in their ``metrics.jsonl``. The
kept calls are made, in order, at the next call after a pause of ``RETRY_S`` and at the end of
the launch (:meth:`Tracker.drain`, which waits up to ``grid.tracking_wait_s`` for the server):
each point's run is created or reused once, its curve logged from where the run says it
stopped, and ended once. The grid sets short HTTP retries for this
(``MLFLOW_HTTP_REQUEST_MAX_RETRIES``, ``..._TIMEOUT``; yours win). Nothing here imports Prefect.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests
from mlflow import MlflowClient
from mlflow.entities import Metric, Run, RunStatus, ViewType
from mlflow.exceptions import MlflowException

from flows.training.loop import read_jsonl
from stages.common import mlflow_store as store

# The launch that last ran a point. Not mlflow.parentRunId: nested runs are folded under their
# parent in the UI's runs table, and a point outlives its launch (one run per point ever), so
# point runs stay flat, ready to compare, group (by tags.arch) and chart in the UI.
LAUNCH_TAG = "nmm.launch"
LOGGED_TAG = "nmm.logged_step"  # last metrics.jsonl step already in the run
# Record fields that are tags or params rather than final metrics.
TAG_FIELDS = ("arch", "moe", "size", "mixture", "seed", "point_id", "group_id", "status",
              "code_fingerprint", "git_revision")  # fmt: skip
# params known only once the point ran (the rest: its run config)
RECORD_PARAMS = ("device", "cpu_kernels")
RETRY_S = 10.0  # after a call found the server unreachable, the next try waits this long
# what an HTTP call to an unreachable server raises (MLflow wraps the requests error in text)
UNREACHABLE = ("Max retries exceeded", "Connection refused", "Failed to establish",
               "Read timed out", "Connection aborted", "RemoteDisconnected")  # fmt: skip
# short retries for the grid's calls (MLflow's defaults wait ~4 minutes per call): a call that
# fails is kept and made again later, so waiting long here only stalls the grid
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}  # fmt: skip

log = logging.getLogger(__name__)


def unreachable(e: BaseException) -> bool:
    """Whether ``e`` says the tracking server could not be reached (rather than refused)."""
    if isinstance(e, requests.ConnectionError | requests.Timeout):
        return True
    return isinstance(e, MlflowException) and any(s in str(e) for s in UNREACHABLE)


def point_runs(client: MlflowClient, experiment_id: str) -> dict[str, Run]:
    """The active point runs of an experiment by their point_id tag (the oldest wins: the run
    a point keeps through retries and relaunches)."""
    runs: dict[str, Run] = {}
    token = None
    while True:
        page = client.search_runs(
            [experiment_id],
            filter_string="tags.`nmm.kind` = 'point'",
            run_view_type=ViewType.ACTIVE_ONLY,
            max_results=10_000,
            order_by=["attributes.start_time ASC"],
            page_token=token,
        )
        for run in page:
            pid = run.data.tags.get("point_id")
            if pid and pid not in runs:
                runs[pid] = run
        token = page.token
        if not token:
            return runs


class Tracker:
    """The MLflow side of one grid launch. Thread-safe: every store call holds ``lock``."""

    def __init__(self, study: str, uri: str | None = None):
        self.uri = store.tracking_uri(uri)
        if self.uri.startswith(("http://", "https://")):
            for k, v in HTTP_DEFAULTS.items():
                os.environ.setdefault(k, v)
        self.client = MlflowClient(self.uri)
        self.lock = threading.RLock()
        # calls kept while the server was unreachable, per point: "start", "finish" (their
        # arguments) and "samples" (system samples not logged yet), made in that order
        self.kept: dict[str, dict[str, Any]] = {}
        self._retry_at = 0.0  # monotonic time before which the server is taken as down
        self.outages = 0  # calls that found the server unreachable (the launch's summary)
        self._uncertain: set[str] = set()  # runs whose last logging call failed part-way
        self._start_failed: set[str] = set()  # points whose run's creation failed (maybe made)
        self.experiment = store.study_experiment(study)
        self.experiment_id = store.experiment(self.client, self.experiment, {"nmm.study": study})
        self.parent_id: str | None = None
        self._logged: dict[str, int] = {}  # run_id -> last metrics.jsonl step logged
        self._status: dict[str, str] = {}  # run_id -> its status tag (running, ok, failed)
        self._runs = self._point_runs()  # point_id -> run_id

    def _point_runs(self) -> dict[str, str]:
        """Every active point run of the experiment, by its point_id tag (oldest wins)."""
        runs = point_runs(self.client, self.experiment_id)
        for run in runs.values():
            self._logged[run.info.run_id] = int(run.data.tags.get(LOGGED_TAG, -1))
            # (the status tag is written before the run ends: one whose end was cut off is
            # not finished, whatever its tag says)
            ended = run.info.status in ("FINISHED", "FAILED")
            self._status[run.info.run_id] = run.data.tags.get("status", "") if ended else "running"
        return {pid: run.info.run_id for pid, run in runs.items()}

    # ------------------------------------------------------------------ launch (parent run)

    def start_launch(
        self, name: str, params: dict[str, Any], tags: dict[str, str], artifacts: list[Path]
    ) -> str:
        with self.lock:
            run = self.client.create_run(
                self.experiment_id, run_name=name, tags={"nmm.kind": "launch", **tags}
            )
            self.parent_id = run.info.run_id
            self._log(self.parent_id, params=store.flatten(params))
            for path in artifacts:
                if path.exists():
                    self.client.log_artifact(self.parent_id, str(path))
            return self.parent_id

    def end_launch(self, metrics: dict[str, float], artifacts: list[Path], ok: bool) -> None:
        """The launch's summary and end (logged, not raised, if the server is unreachable)."""
        if self.parent_id is None:
            return
        parent = self.parent_id

        def end() -> None:
            self._log(parent, metrics={**metrics, "launch/mlflow_outages": float(self.outages)})
            for path in artifacts:
                if path.exists():
                    self.client.log_artifact(parent, str(path))
            status = RunStatus.to_string(RunStatus.FINISHED if ok else RunStatus.FAILED)
            self.client.set_terminated(parent, status)

        with self.lock:
            self._retry_at = 0.0
            if not self._attempt(end):
                log.warning("the launch run %s was not ended: MLflow unreachable", parent)

    # ------------------------------------------------------------------ points (child runs)

    def run_id(self, point_id: str) -> str | None:
        with self.lock:
            return self._runs.get(point_id)

    def needs_finish(self, point_id: str) -> bool:
        """A trained point whose run is missing (a new store) or never ended (a killed grid)."""
        with self.lock:
            run_id = self._runs.get(point_id)
            return run_id is None or self._status.get(run_id) != "ok"

    def start_point(
        self, name: str, point_id: str, tags: dict[str, str], params: dict[str, Any]
    ) -> str | None:
        """The point's run, created once; a reused run is RUNNING again under this launch.
        None while the server is unreachable (made later: the module docstring)."""
        with self.lock:
            self.kept.setdefault(point_id, {})["start"] = (name, tags, params)
            self._catch_up(point_id)
            return self._runs.get(point_id) if "start" not in self.kept.get(point_id, {}) else None

    def log_progress(
        self, point_id: str, metrics_path: Path, system: list[tuple[int, int, dict[str, float]]]
    ) -> None:
        """Rows of ``metrics_path`` past the last logged step, and system samples
        ``(timestamp_ms, step, {name: value})``, to the point's run (kept while the server is
        unreachable)."""
        with self.lock:
            kept = self.kept.setdefault(point_id, {})
            kept["samples"] = kept.get("samples", []) + list(system)
            self._catch_up(point_id)
            if "start" in kept or point_id not in self._runs:
                return
            samples = kept.pop("samples", [])
            if not self._attempt(
                lambda: self._progress(self._runs[point_id], metrics_path, samples)
            ):
                kept["samples"] = samples + kept.get("samples", [])
            if not kept:
                self.kept.pop(point_id, None)

    def finish_point(
        self,
        point_id: str,
        record: dict[str, Any],
        metrics_path: Path,
        artifacts: list[Path],
        system: dict[str, float],
    ) -> None:
        """The curve's tail, final metrics, derived params, status; then the run ends (kept
        while the server is unreachable)."""
        with self.lock:
            self.kept.setdefault(point_id, {})["finish"] = (record, metrics_path, artifacts, system)
            self._catch_up(point_id)

    def drain(self, wait_s: float) -> list[str]:
        """Make the calls kept while the server was unreachable, waiting up to ``wait_s``
        seconds for it; returns the point ids still waiting (logged; a later launch finishes
        their runs from their records)."""
        deadline = time.monotonic() + wait_s
        while True:
            with self.lock:
                if self.waiting():
                    self._retry_at = 0.0
                    self._catch_up()
                left = self.waiting()
            if not left or time.monotonic() >= deadline:
                break
            time.sleep(min(RETRY_S / 2, max(0.0, deadline - time.monotonic())))
        if left:
            log.warning(
                "MLflow at %s still unreachable after %.0f s: the runs of %d point(s) wait (%s); "
                "the next launch of the grid logs them from their records",
                self.uri, wait_s, len(left), ", ".join(left[:5]),
            )  # fmt: skip
        return left

    # ------------------------------------------------------------------ kept calls

    def _attempt(self, call: Callable[[], Any]) -> bool:
        """``call()``; False (and the server taken as down for ``RETRY_S``) if the server
        could not be reached. Other errors propagate."""
        if time.monotonic() < self._retry_at:
            return False
        try:
            call()
        except Exception as e:
            if not unreachable(e):
                raise
            if not self._retry_at:  # (once an outage)
                log.warning("MLflow at %s unreachable (%s): training goes on; its runs are "
                            "logged when it is back", self.uri, str(e)[:300])  # fmt: skip
            self.outages += 1
            self._retry_at = time.monotonic() + RETRY_S
            return False
        if self._retry_at:
            log.warning("MLflow at %s is back: logging what waited", self.uri)
            self._retry_at = 0.0
        return True

    def _catch_up(self, caller: str | None = None) -> bool:
        """Make the kept calls, point by point in order; False at the first that finds the
        server unreachable. A kept call that fails otherwise (the run was deleted, say) is
        dropped and logged; it is raised only if it is ``caller``'s own point's."""
        for pid in list(self.kept):
            try:
                if not self._catch_up_point(pid):
                    return False
            except Exception:
                self.kept.pop(pid, None)
                if pid == caller:
                    raise
                log.exception("MLflow: the kept calls of point %s failed: dropped", pid)
        return True

    def _catch_up_point(self, pid: str) -> bool:
        kept = self.kept[pid]
        if "start" in kept:
            if not self._attempt(lambda: self._start(pid, *kept["start"])):
                self._start_failed.add(pid)
                return False
            del kept["start"]
        if "finish" in kept:
            samples = kept.get("samples", [])
            if not self._attempt(lambda: self._finish(self._runs[pid], samples, *kept["finish"])):
                self._uncertain.add(self._runs[pid])  # (it may have logged part of it)
                return False
            del kept["finish"]
            kept.pop("samples", None)
        if not kept:
            del self.kept[pid]
        return True

    def waiting(self) -> list[str]:
        """The points whose run's start or end waits for the server."""
        with self.lock:
            return sorted(p for p, k in self.kept.items() if "start" in k or "finish" in k)

    def _start(self, point_id: str, name: str, tags: dict[str, str], params: dict[str, Any]):
        tags = {"nmm.kind": "point", "point_id": point_id, "status": "running", **tags}
        if self.parent_id:
            tags[LAUNCH_TAG] = self.parent_id
        run_id = self._runs.get(point_id)
        if run_id is None and point_id in self._start_failed:  # made, its answer lost?
            found = self.client.search_runs([self.experiment_id],
                                            f"tags.point_id = '{point_id}'")  # fmt: skip
            if found:
                run_id = self._runs[point_id] = found[0].info.run_id
                self._logged[run_id] = int(found[0].data.tags.get(LOGGED_TAG, -1))
        self._start_failed.discard(point_id)
        if run_id is None:
            run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
            run_id = self._runs[point_id] = run.info.run_id
            self._logged[run_id] = -1
            self._log(run_id, params=params)
        else:
            self.client.update_run(run_id, status="RUNNING")
            self._log(run_id, tags=tags)
            self._log_new_params(run_id, params)
        self._status[run_id] = "running"

    def _progress(
        self, run_id: str, metrics_path: Path, system: list[tuple[int, int, dict[str, float]]]
    ) -> None:
        last = self._logged.get(run_id, -1)
        metrics: list[Metric] = []
        now = int(time.time() * 1000)
        for row in read_jsonl(metrics_path):
            step = int(row["step"])
            if step <= last:
                continue
            last = step
            for k, v in row.items():
                x = store.number(v)
                if k != "step" and x is not None:
                    metrics.append(Metric(store.metric_key(k), x, now, step))
        for ts, step, sample in system:
            metrics += [Metric(f"system/{k}", float(v), ts, step) for k, v in sample.items()]
        if metrics:
            self._log_once(run_id, metrics, tags={LOGGED_TAG: str(last)})
            self._logged[run_id] = last

    def _log_once(self, run_id: str, metrics: list[Metric], tags: dict[str, str]) -> None:
        """Log ``metrics`` (then ``tags``), in as many calls as MLflow's limits need. After a
        call to this run failed part-way (some calls made, or made but unanswered), what the
        run already has is read back first and left out: no step is logged twice."""
        if run_id in self._uncertain:
            metrics = self._not_logged(run_id, metrics)
        self._uncertain.add(run_id)
        self._log(run_id, metrics=metrics, tags=tags)
        self._uncertain.discard(run_id)

    def _not_logged(self, run_id: str, metrics: list[Metric]) -> list[Metric]:
        """``metrics`` less those the run has: by step for curves and final values (a key's
        steps only grow), by step and time for system samples."""
        have: dict[str, Any] = {}
        for key in {m.key for m in metrics}:
            history = self.client.get_metric_history(run_id, key)
            if key.startswith("system/"):
                have[key] = {(m.step, m.timestamp) for m in history}
            else:
                have[key] = max((m.step for m in history), default=-1)
        return [
            m
            for m in metrics
            if (
                (m.step, m.timestamp) not in have[m.key]
                if m.key.startswith("system/")
                else m.step > have[m.key]
            )
        ]

    def _finish(
        self,
        run_id: str,
        samples: list[tuple[int, int, dict[str, float]]],
        record: dict[str, Any],
        metrics_path: Path,
        artifacts: list[Path],
        system: dict[str, float],
    ) -> None:
        self._progress(run_id, metrics_path, samples)
        step = int(record.get("steps") or 0)
        now = int(time.time() * 1000)
        final = [
            Metric(f"final/{k}", x, now, step)
            for k, v in sorted(record.items())
            if k not in TAG_FIELDS + RECORD_PARAMS and (x := store.number(v)) is not None
        ]
        final += [Metric(f"system/{k}", float(v), now, step) for k, v in system.items()]
        status = record.get("status") or "failed"
        tags = {"status": status}
        if record.get("error"):
            tags["error"] = str(record["error"])[:5000]
        elif "error" in self.client.get_run(run_id).data.tags:  # an earlier attempt's
            self.client.delete_tag(run_id, "error")
        self._log_once(run_id, final, tags)
        derived = {f"record.{k}": record[k] for k in RECORD_PARAMS if k in record}
        self._log_new_params(run_id, derived)
        for path in artifacts:
            if path.exists():
                self.client.log_artifact(run_id, str(path))
        end = RunStatus.FINISHED if status == "ok" else RunStatus.FAILED
        self.client.set_terminated(run_id, RunStatus.to_string(end))
        self._status[run_id] = status

    # ------------------------------------------------------------------ helpers

    def _log_new_params(self, run_id: str, params: dict[str, Any]) -> None:
        """Params are immutable in MLflow: log only the keys the run does not have yet."""
        have = self.client.get_run(run_id).data.params
        self._log(run_id, params={k: v for k, v in params.items() if k not in have})

    def _log(
        self,
        run_id: str,
        metrics: list[Metric] | dict[str, float] | None = None,
        params: dict[str, Any] | None = None,
        tags: dict[str, str] | None = None,
    ) -> None:
        store.log_batch(self.client, run_id, metrics, params, tags)
