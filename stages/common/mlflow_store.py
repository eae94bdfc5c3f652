"""MLflow, the parts every user of it here shares: where records go, what experiments are
called, get-or-create, and how values are logged.

Users: the grid's launch and point runs (flows/tracking.py), runs.parquet from the store
(flows/collect.py), the fits' runs and registered models (stages/scaling/tracking.py) and the
servers of ``make ui`` (flows/ui.py).

- :func:`tracking_uri`: an explicit URI (a flag, or ``fit.mlflow.tracking_uri``), else
  ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<repo>/mlflow.db``, no server needed; artifacts of
  such a local store go beside it (:func:`artifact_root`);
- :func:`study_experiment`: the grid's experiment ``nmm-<grid.study>``; the fits' experiment is
  ``fit.mlflow.experiment``;
- :func:`experiment`: get-or-create, safe when two processes create it at once, restoring one
  deleted in the UI;
- :func:`flatten`, :func:`numbers`, :func:`log_batch`: nested dicts as dotted keys, and logging
  in batches of MLflow's size limits.

mlflow itself is imported only by the functions that talk to a store.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse

from stages.common.paths import ROOT

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Metric

# Experiment tag: the MLflow UI opens the experiment in its "model training" view (runs table,
# charts), not the GenAI overview.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
BATCH = 1000  # metrics per log_batch call (MLflow's limit)
PARAMS_BATCH = 100  # params or tags per log_batch call (MLflow's limit)
PARAM_CHARS = 6000  # MLflow's longest param value


def local_store(root: Path = ROOT) -> str:
    """The project's SQLite store: ``sqlite:///<root>/mlflow.db`` (absolute)."""
    return f"sqlite:///{(Path(root) / 'mlflow.db').resolve()}"


def tracking_uri(explicit: str | None = None) -> str:
    """``explicit`` if given, else ``$MLFLOW_TRACKING_URI``, else :func:`local_store`."""
    return explicit or os.environ.get("MLFLOW_TRACKING_URI") or local_store()


def artifact_root(uri: str) -> str | None:
    """Artifacts beside a SQLite store (``<dir>/mlruns``); a server decides its own."""
    if urlparse(uri).scheme != "sqlite":
        return None
    db = Path(unquote(uri.removeprefix("sqlite:///")))
    return (db.parent / "mlruns").resolve().as_uri()


def study_experiment(study: str) -> str:
    """The MLflow experiment of a grid study (params ``grid.study``)."""
    return f"nmm-{study}"


def experiment(client: MlflowClient, name: str, tags: dict[str, str] | None = None) -> str:
    """The id of experiment ``name``, created (artifacts beside a local store, tagged
    ``tags`` and :data:`EXPERIMENT_KIND`) if it does not exist; one another process created
    meanwhile is used, one deleted in the UI is restored (the study lives on)."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(
                name,
                artifact_location=artifact_root(client.tracking_uri),
                tags={**(tags or {}), **EXPERIMENT_KIND},
            )
        except MlflowException:  # created meanwhile by another process
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        client.restore_experiment(exp.experiment_id)
    return exp.experiment_id


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists stay values."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out |= flatten(v, f"{key}.")
        else:
            out[key] = v
    return out


def number(v: Any) -> float | None:
    """``v`` as a metric value: a finite int or float (not a bool), else None."""
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        return None
    return float(v)


def numbers(d: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The finite numbers of a nested dict, as metrics with dotted keys."""
    return {k: x for k, v in flatten(d, prefix).items() if (x := number(v)) is not None}


def metric_key(name: str) -> str:
    """Any key as a valid MLflow metric name."""
    return re.sub(r"[^A-Za-z0-9_\-. /]", "_", name)


def param_value(v: Any) -> str:
    s = v if isinstance(v, str) else json.dumps(v)
    return s[:PARAM_CHARS]


def _chunks(items: list, n: int) -> Iterable[list]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


def log_batch(
    client: MlflowClient,
    run_id: str,
    metrics: list[Metric] | dict[str, float] | None = None,
    params: dict[str, Any] | None = None,
    tags: dict[str, Any] | None = None,
) -> None:
    """Log metrics (``Metric`` entities, or a dict logged at step 0 now), params (JSON-encoded
    unless strings) and tags to ``run_id`` in as many calls as MLflow's limits need; tags
    last, so that a tag describing the metrics lands after them."""
    from mlflow.entities import Metric, Param, RunTag

    if isinstance(metrics, dict):
        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, 0) for k, v in metrics.items()]
    for chunk in _chunks(list(metrics or []), BATCH):
        client.log_batch(run_id, metrics=chunk, synchronous=True)
    entries = [Param(k, param_value(v)) for k, v in (params or {}).items()]
    for chunk in _chunks(entries, PARAMS_BATCH):
        client.log_batch(run_id, params=chunk, synchronous=True)
    for chunk in _chunks([RunTag(k, str(v)) for k, v in (tags or {}).items()], PARAMS_BATCH):
        client.log_batch(run_id, tags=chunk, synchronous=True)
