"""Where MLflow records go: the one function that decides the tracking URI, and the layout of
a local store (artifacts beside the SQLite file).

Every MLflow user here (the grid's point runs, the fit's runs and registered models, ``make
ui``) calls :func:`tracking_uri`: an explicit URI (a flag, or ``fit.mlflow.tracking_uri``),
else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<repo>/mlflow.db``, no server needed. This
module does not import mlflow.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import unquote, urlparse

ROOT = Path(__file__).resolve().parents[2]  # the repository
# Experiment tag: the MLflow UI opens the experiment in its "model training" view (runs table,
# charts), not the GenAI overview.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


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
