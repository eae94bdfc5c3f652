"""MLflow records of the scaling-law fits: runs, figures, and a versioned model per arch.

Per arch, :func:`log_fits` makes a run ``fit-<arch>`` (fit settings, git revision, the runs
table's md5, the arch's loss-compute figure, fits.json) with a nested run per target (every
number of its fits.json entry as a metric, among them every law family's held-out errors
``families.<family>.heldout_mre``; tags ``law`` and ``law_why``: the family chosen and why; its
figures as artifacts). It registers the arch's
laws as the model ``<fit.mlflow.model_prefix><arch>`` (default ``scaling-law-early``, ...), a
new version only when the fitted parameters changed: each version carries the tag
``params_hash`` (:func:`stages.scaling.law.law_hash`), compared with the latest version's.

The model (:class:`ScalingLawModel`, an ``mlflow.pyfunc`` model) predicts from a DataFrame:

- with columns ``N``, ``D`` (and ``target``): a DataFrame with columns ``L``, the loss the
  target's chosen law (its fits.json ``law``: paper, shared, floor or smooth_min) predicts, and
  ``L_low``, ``L_high``, its prediction interval at ``fit.ci`` (stages/scaling/predictive.py:
  the parameters' bootstrap, the runs' scatter, the families the choice could not separate);
- with a column ``C`` (and ``target``): columns ``N_opt``, ``D_opt``, ``L_opt``, the
  compute-optimal allocation of C = 6 ratio N D (closed form, ``ratio`` = the fit's C/6ND).

Without ``target`` the model's only target is used, else ``avg``. ``unwrap_python_model()``
also offers ``loss(N, D, target)``, ``interval(N, D, target)`` and ``optimum(C, target)``. The model's code is pickled by
value, so loading it needs mlflow, numpy and pandas, not this repository.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import cloudpickle
import mlflow
import numpy as np
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types import ColSpec, Schema

import stages.scaling.law
import stages.scaling.predictive
from stages.common import mlflow_store as store
from stages.common.provenance import git_revision
from stages.params import FitParams
from stages.scaling.fit import TargetFit
from stages.scaling.law import law_from_entry, law_hash
from stages.scaling.predictive import predict as predict_interval

log = logging.getLogger(__name__)
MODEL_REQUIREMENTS = ("mlflow", "numpy", "pandas", "cloudpickle")
SIGNATURE = ModelSignature(
    inputs=Schema(
        [
            ColSpec("double", "N", required=False),
            ColSpec("double", "D", required=False),
            ColSpec("double", "C", required=False),
            ColSpec("string", "target", required=False),
        ]
    )
)


class ScalingLawModel(mlflow.pyfunc.PythonModel):
    """The fitted L(N, D) of every target of one arch, and its compute-optimal allocation."""

    def __init__(self, laws: dict[str, dict[str, float]] | None = None):
        self.laws: dict[str, dict[str, float]] = laws or {}

    def load_context(self, context) -> None:
        if "law" in context.artifacts:
            self.laws = json.loads(Path(context.artifacts["law"]).read_text())

    def _target(self, target: str | None) -> str:
        if target is None:
            if len(self.laws) == 1:
                target = next(iter(self.laws))
            elif "avg" in self.laws:
                target = "avg"
            else:
                raise ValueError(f"say which target: the model has {', '.join(self.laws)}")
        if target not in self.laws:
            raise ValueError(f"unknown target {target!r}: the model has {', '.join(self.laws)}")
        return target

    def _law(self, target: str | None) -> tuple[Any, float]:
        target = self._target(target)
        p = self.laws[target]
        law = law_from_entry(p)
        if law is None:
            raise ValueError(f"target {target!r}: the law has a missing or infinite parameter")
        return law, p["compute_ratio"]

    def loss(self, N: Any, D: Any, target: str | None = None) -> np.ndarray:
        return self._law(target)[0].loss(N, D)

    def interval(self, N: Any, D: Any, target: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The prediction interval (low, high) at (N, D); NaN for a fit without a bootstrap."""
        p = predict_interval(self.laws[self._target(target)], N, D)
        return p["low"], p["high"]

    def optimum(
        self, C: Any, target: str | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(N_opt, D_opt, L_opt) for budgets C."""
        law, ratio = self._law(target)
        return law.optimum(np.asarray(C, float), ratio)

    def predict(
        self, context, model_input: pd.DataFrame, params: dict | None = None
    ) -> pd.DataFrame:
        df = pd.DataFrame(model_input).reset_index(drop=True)
        raw = df["target"].astype(object) if "target" in df.columns else [None] * len(df)
        rows: dict[str | None, list[int]] = {}
        for i, t in enumerate(raw):
            rows.setdefault(t if isinstance(t, str) and t else None, []).append(i)

        def given(*cols: str) -> bool:
            return set(cols) <= set(df.columns) and bool(df[list(cols)].notna().all().all())

        if given("N", "D"):
            N, D, L = df.N.to_numpy(float), df.D.to_numpy(float), np.empty((len(df), 3))
            for t, i in rows.items():
                L[i, 0] = self.loss(N[i], D[i], t)
                L[i, 1], L[i, 2] = self.interval(N[i], D[i], t)
            return pd.DataFrame(L, columns=["L", "L_low", "L_high"])
        if given("C"):
            C, out = df.C.to_numpy(float), np.empty((len(df), 3))
            for t, i in rows.items():
                out[i] = np.column_stack(self.optimum(C[i], t))
            return pd.DataFrame(out, columns=["N_opt", "D_opt", "L_opt"])
        raise ValueError("predict needs columns N and D (-> L) or C (-> N_opt, D_opt, L_opt)")


# ------------------------------------------------------------------------------ logging


def file_md5(path: str | Path) -> str:
    """The md5 DVC records for a file (its data revision)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "md5").hexdigest()


def latest_version(client: MlflowClient, name: str):
    versions = client.search_model_versions(f"name = '{name}'")
    return max(versions, key=lambda v: int(v.version), default=None)


def register(
    client: MlflowClient, name: str, fits: list[TargetFit], tags: dict[str, str], tmp: Path
) -> tuple[str, bool, float]:
    """Log and register the arch's model unless its latest version has the same params_hash.

    Returns (version, created, seconds spent logging and registering).
    """
    laws = {f.target: f.law for f in fits}
    ratios = {f.target: f.budget.ratio for f in fits}
    intervals = {f.target: f.prediction() for f in fits}
    spans = {t: [(p or {}).get(k) for k in ("families", "level")] for t, p in intervals.items()}
    digest = law_hash(laws, ratios, spans)
    latest = latest_version(client, name)
    if latest is not None and latest.tags.get("params_hash") == digest:
        log.info(
            "%s: fit unchanged (params_hash %s): keeping version %s", name, digest, latest.version
        )
        return str(latest.version), False, 0.0
    law_json = tmp / "law.json"
    law_json.write_text(
        json.dumps(
            {
                t: {
                    "law": laws[t].family,
                    **laws[t].as_dict(),
                    "compute_ratio": ratios[t],
                    "prediction": intervals[t],
                }
                for t in laws
            },
            indent=2,
        )  # fmt: skip
    )
    t0 = time.perf_counter()
    by_value = (
        stages.scaling.law,
        stages.scaling.predictive,
        sys.modules[__name__],
    )  # the model loads without this repository
    for module in by_value:
        cloudpickle.register_pickle_by_value(module)
    try:
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=ScalingLawModel(),
            artifacts={"law": str(law_json)},
            pip_requirements=[f"{p}=={version(p)}" for p in MODEL_REQUIREMENTS],
            signature=SIGNATURE,
            input_example=pd.DataFrame({"N": [1e9], "D": [2e10], "target": [next(iter(laws))]}),
        )
    finally:
        for module in by_value:
            cloudpickle.unregister_pickle_by_value(module)
    mv = mlflow.register_model(info.model_uri, name, tags={**tags, "params_hash": digest})
    seconds = time.perf_counter() - t0
    log.info("%s: registered version %s in %.1f s", name, mv.version, seconds)
    return str(mv.version), True, seconds


def log_fits(
    fits: dict[str, TargetFit],
    fit: FitParams,
    plot_files: dict[str, list[Path]] | None = None,
    runs_path: str | Path | None = None,
    fits_path: str | Path | None = None,
    extra: list[str | Path] = (),
) -> dict[str, dict[str, Any]]:
    """Log every fit to MLflow and register a model per arch (see the module docstring).

    Returns per arch: run_id, model name, version, whether the version is new, seconds spent
    registering. ``plot_files`` are :func:`stages.scaling.plots.write_plots`' files per arch and
    per arch/target.
    ``extra``: more files logged beside fits.json (the sparsity-aware laws).
    """
    mlflow.set_tracking_uri(store.tracking_uri(fit.mlflow.tracking_uri))
    client = MlflowClient()
    exp = store.experiment(client, fit.mlflow.experiment)
    rev = git_revision()
    tags = {"git_commit": rev.commit, "git_dirty": str(rev.dirty).lower()}
    if runs_path is not None and Path(runs_path).is_file():
        tags["runs_md5"] = file_md5(runs_path)
        tags["runs_path"] = str(runs_path)
    settings = {
        "law": fit.law,
        "families": ",".join(fit.families),
        "parsimony": fit.parsimony,
        "huber_delta": fit.huber_delta,
        "starts": int(np.prod([len(v) for v in fit.init.model_dump().values()])),
        "starts_per_exponent_pair": fit.starts_per_exponent_pair,
        "bootstrap": fit.bootstrap,
        "bootstrap_starts": fit.bootstrap_starts,
        "ci": fit.ci,
        "holdout_fraction": fit.holdout_fraction,
        "init": json.dumps(fit.init.model_dump()),
    }
    plot_files = plot_files or {}
    by_arch: dict[str, list[TargetFit]] = {}
    for f in fits.values():
        by_arch.setdefault(f.arch, []).append(f)
    out: dict[str, dict[str, Any]] = {}
    for arch, group in sorted(by_arch.items()):
        name = f"{fit.mlflow.model_prefix}{arch}"
        with (
            mlflow.start_run(experiment_id=exp, run_name=f"fit-{arch}") as parent,
            tempfile.TemporaryDirectory() as tmp,
        ):
            run_tags = {**tags, "arch": arch, "kind": "scaling-law-fit"}
            settings_ = {k: str(v) for k, v in settings.items()}
            store.log_batch(client, parent.info.run_id, params=settings_, tags=run_tags)
            for f in group:
                with mlflow.start_run(
                    experiment_id=exp, run_name=f"fit-{f.key}", nested=True
                ) as child:
                    store.log_batch(
                        client,
                        child.info.run_id,
                        metrics=store.numbers(f.metrics()),
                        params={"arch": arch, "target": f.target, "n_points": str(len(f.runs))},
                        tags={
                            **run_tags,
                            "target": f.target,
                            "law": f.choice,
                            "law_why": f.why[:5000],
                        },  # fmt: skip
                    )
                    for path in plot_files.get(f.key, []):
                        mlflow.log_artifact(str(path), artifact_path="plots")
            for path in plot_files.get(arch, []):
                mlflow.log_artifact(str(path), artifact_path="plots")
            for path in (fits_path, *extra):
                if path is not None and Path(path).is_file():
                    mlflow.log_artifact(str(path))
            laws = {f"law.{f.target}": f.choice for f in group}  # the version says which law
            ver, created, seconds = register(
                client, name, group, {**tags, **laws, "run_id": parent.info.run_id}, Path(tmp)
            )
            mlflow.set_tags(
                {"model": name, "model_version": ver, "model_version_created": str(created).lower()}
            )
        out[arch] = {
            "run_id": parent.info.run_id,
            "model": name,
            "version": ver,
            "created": created,
            "seconds": seconds,
        }
    return out
