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
  and the fingerprints of its data, then ``record.device``; tags: arch, moe, size,
  tokens, mixture, seed, point_id, group_id, code_fingerprint, git_revision, status (error);
  metrics: the curves of ``metrics.jsonl`` (step = optimizer step), ``final/<field>`` from the
  record, and ``system/*`` samples of the point's process tree (CPU %, RSS; peak RSS and CPU
  seconds at the end), which the UI shows in its System metrics tab.

Metric curves are logged incrementally while a point trains (the tag ``nmm.logged_step``
remembers how far), in batches (stages/common/mlflow_store.py). Every call goes through one
lock: grid tasks run in threads of one process, and SQLite wants one writer at a time.
Nothing here imports Prefect.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Run, RunStatus, ViewType

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
RECORD_PARAMS = ("device",)  # params known only once the point ran (the rest: its run config)


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
        self.client = MlflowClient(self.uri)
        self.lock = threading.RLock()
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
            self._status[run.info.run_id] = run.data.tags.get("status", "")
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
        if self.parent_id is None:
            return
        with self.lock:
            self._log(self.parent_id, metrics=metrics)
            for path in artifacts:
                if path.exists():
                    self.client.log_artifact(self.parent_id, str(path))
            status = RunStatus.to_string(RunStatus.FINISHED if ok else RunStatus.FAILED)
            self.client.set_terminated(self.parent_id, status)

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
    ) -> str:
        """The point's run, created once; a reused run is RUNNING again under this launch."""
        with self.lock:
            tags = {"nmm.kind": "point", "point_id": point_id, "status": "running", **tags}
            if self.parent_id:
                tags[LAUNCH_TAG] = self.parent_id
            run_id = self._runs.get(point_id)
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
            return run_id

    def log_progress(
        self, run_id: str, metrics_path: Path, system: list[tuple[int, int, dict[str, float]]]
    ) -> None:
        """Rows of ``metrics_path`` past the last logged step, and system samples
        ``(timestamp_ms, step, {name: value})``."""
        with self.lock:
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
                self._log(run_id, metrics=metrics, tags={LOGGED_TAG: str(last)})
                self._logged[run_id] = last

    def finish_point(
        self,
        run_id: str,
        record: dict[str, Any],
        metrics_path: Path,
        artifacts: list[Path],
        system: dict[str, float],
    ) -> None:
        """The curve's tail, final metrics, derived params, status; then the run ends."""
        with self.lock:
            self.log_progress(run_id, metrics_path, [])
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
            self._log(run_id, metrics=final, tags=tags)
            self._status[run_id] = status
            derived = {f"record.{k}": record[k] for k in RECORD_PARAMS if k in record}
            self._log_new_params(run_id, derived)
            for path in artifacts:
                if path.exists():
                    self.client.log_artifact(run_id, str(path))
            end = RunStatus.FINISHED if status == "ok" else RunStatus.FAILED
            self.client.set_terminated(run_id, RunStatus.to_string(end))

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
