"""runs.parquet from the shared MLflow store, not from one machine's results directory.

When grids run on several machines into one MLflow (a team's server, docs/scale-out.md),
no machine holds every ``record.json``. :func:`collect` plans the grid here (the point ids of
this checkout's params, data and code), finds each point's MLflow run by its ``point_id`` tag,
reads the ``record.json`` the run carries as an artifact, and writes the rows in grid order.
A run made by other code or data has another point id, so it is never collected as current;
a planned point without a finished run is reported missing.

``python -m flows.grid collect [--params ...] --tracking-uri URI [--out results/runs.parquet]``
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlflow import MlflowClient

from flows import records
from flows.plan import Job
from flows.tracking import point_runs
from stages.common.mlflow_store import study_experiment, tracking_uri


@dataclass
class Collected:
    rows: list[dict[str, Any]] = field(default_factory=list)
    missing: list[Job] = field(default_factory=list)  # planned, no finished run in the store

    @property
    def summary(self) -> str:
        ok = sum(r.get("status") == "ok" for r in self.rows)
        return (f"{len(self.rows)} points collected ({ok} ok, {len(self.rows) - ok} failed), "
                f"{len(self.missing)} missing")  # fmt: skip


def collect(jobs: list[Job], study: str, uri: str | None, out: Path | None = None) -> Collected:
    """The records of ``jobs`` from MLflow experiment ``nmm-<study>``; written to ``out``."""
    client = MlflowClient(tracking_uri(uri))
    exp = client.get_experiment_by_name(study_experiment(study))
    found = Collected()
    runs = point_runs(client, exp.experiment_id) if exp is not None else {}
    with tempfile.TemporaryDirectory() as tmp:
        for job in jobs:
            run = runs.get(job.point_id)
            if run is None or run.info.status not in ("FINISHED", "FAILED"):
                found.missing.append(job)
                continue
            try:
                path = client.download_artifacts(run.info.run_id, "record.json", tmp)
            except Exception:  # a run that ended before its record was logged (a crash)
                found.missing.append(job)
                continue
            rec = json.loads(Path(path).read_text())
            if rec.get("point_id") != job.point_id or rec.get("code_fingerprint") != job.code:
                raise ValueError(
                    f"MLflow run {run.info.run_id} is tagged point {job.point_id} but its "
                    f"record is point {rec.get('point_id')} (code {rec.get('code_fingerprint')}); "
                    "nothing written"
                )
            found.rows.append({**rec, "mlflow_run_id": run.info.run_id})
    if out is not None:
        records.write_table(found.rows, Path(out))
    return found
