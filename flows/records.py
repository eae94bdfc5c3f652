"""The grid's records on disk: a ``record.json`` per point and ``runs.parquet``, the table.

``results/points/<point_id>/record.json`` is written by flows/training/point.py when a point
ends (ok or failed), beside the run config its process read (``config.json``); the grid flow
adds ``mlflow_run_id`` to it, and writes one itself for a point whose process crashed. ``results/runs.parquet`` has one row per finished point of the CURRENT params
(records of points no longer in the grid stay on disk but out of the table); it is rewritten
atomically after every finished point, so an interrupted grid still leaves a valid table.
Columns come in a fixed order with fixed types (:data:`COLUMNS`); a field a newer record adds
is appended after them. Nothing here imports Prefect or MLflow.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from stages.common.stage import atomic_write

STR, INT, FLOAT, BOOL = pa.string(), pa.int64(), pa.float64(), pa.bool_()
# The columns of runs.parquet, in order (flows/training/point.py's record, plus mlflow_run_id).
COLUMNS: dict[str, pa.DataType] = {
    "point_id": STR,  # hash of everything that changes the result (flows/plan.py point_id)
    "group_id": STR,  # points that share one constant-lr trunk (cooldown branching)
    "code_fingerprint": STR,  # the code that trained it (flows/plan.py)
    "git_revision": STR,  # the checkout's commit (+dirty if the fingerprinted code differed)
    "status": STR,  # "ok" | "failed"
    "error": STR,  # why it failed (None when ok)
    "arch": STR,  # grid arch name (early, late, discrete, early-moe, ...)
    "arch_base": STR,  # early | late | discrete
    "moe": BOOL,
    "modality_aware": BOOL,
    "n_experts": INT,  # MoE: experts per layer (grid.experts or model.n_experts), else None
    "top_k": INT,  # MoE: experts per token
    "sparsity": FLOAT,  # MoE: S = 1 - top_k / n_experts (Abnar et al. 2025)
    "size": STR,  # ladder size name
    "width": INT,
    "depth": INT,
    "mixture": STR,  # key of params.grid.mixtures
    "seed": INT,
    "tokens_budget": INT,  # the point's D budget (params.grid.tokens)
    "N": INT,  # active non-embedding params of the decoder (model/counting.py)
    "N_v": INT,  # vision encoder params (late fusion)
    "N_total": INT,
    "D": INT,  # decoder tokens trained on
    "D_image": INT,
    "D_text": INT,  # text targets (the loss is on text only)
    "C": FLOAT,  # training compute, 6ND or 6(N_v D_v + N D)
    "flops": FLOAT,  # model FLOPs actually done
    "loss_caption": FLOAT,  # validation loss per kind, and their average
    "loss_interleaved": FLOAT,
    "loss_text": FLOAT,
    "loss_avg": FLOAT,
    "train_loss": FLOAT,
    "steps": INT,
    "batch_rows": INT,
    "lr": FLOAT,  # peak learning rate
    "branch_step": INT,  # cooldown start (where the point branched from its group's trunk)
    "wall_s": FLOAT,
    "train_s": FLOAT,
    "tokens_per_s": FLOAT,
    "mfu": FLOAT,
    "device": STR,
    "cpu_kernels": STR,  # the CPU code paths it ran (flows/devices.py: AVX2 pinned on x86)
    "processes": INT,  # processes that trained it (train.processes: torchrun ranks)
    "mlflow_run_id": STR,
}


NOT_IN_TABLE = ("config",)  # record fields kept out of the table (in record.json and MLflow)


def point_dir(results: Path, point_id: str) -> Path:
    return Path(results) / "points" / point_id


def record_path(results: Path, point_id: str) -> Path:
    return point_dir(results, point_id) / "record.json"


def config_path(results: Path, point_id: str) -> Path:
    """The point's run config (flows/config.py), what its process trains with."""
    return point_dir(results, point_id) / "config.json"


def read_record(results: Path, point_id: str) -> dict[str, Any] | None:
    path = record_path(results, point_id)
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def is_done(record: dict[str, Any] | None) -> bool:
    return record is not None and record.get("status") == "ok"


def write_record(results: Path, point_id: str, record: dict[str, Any]) -> None:
    text = json.dumps(record, indent=1, sort_keys=True)
    atomic_write(record_path(results, point_id), text)


def crash_record(
    point: dict[str, Any], point_id: str, group_id: str, code: str, error: str
) -> dict[str, Any]:
    """The record of a point whose process did not return one (crash, kill, timeout)."""
    return {
        "point_id": point_id,
        "group_id": group_id,
        "code_fingerprint": code,
        **{k: point[k] for k in ("arch", "size", "mixture", "seed")},
        "tokens_budget": point["tokens"],
        "status": "failed",
        "error": error,
    }


def _cast(value: Any, kind: pa.DataType) -> Any:
    if value is None:
        return None
    if kind == INT:
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(f"not an integer: {value}")
        return int(value)
    if kind == FLOAT:
        return float(value)
    if kind == BOOL:
        return bool(value)
    if kind == STR:
        return str(value)
    return value


def table(rows: Iterable[dict[str, Any]]) -> pa.Table:
    """The runs table: :data:`COLUMNS` first (typed), then any extra record field (inferred)."""
    rows = list(rows)
    extra = sorted({k for r in rows for k in r} - set(COLUMNS) - set(NOT_IN_TABLE))
    arrays, fields = [], []
    for name, kind in COLUMNS.items():
        arrays.append(pa.array([_cast(r.get(name), kind) for r in rows], type=kind))
        fields.append(pa.field(name, kind))
    for name in extra:
        values = [r.get(name) for r in rows]
        values = [json.dumps(v) if isinstance(v, dict | list) else v for v in values]
        try:
            arr = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            arr = pa.array([None if v is None else str(v) for v in values], type=STR)
        arrays.append(arr)
        fields.append(pa.field(name, arr.type))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def write_table(rows: Iterable[dict[str, Any]], path: Path) -> None:
    """Write runs.parquet atomically (a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table(rows), tmp)
    os.replace(tmp, path)


def read_table(path: Path) -> list[dict[str, Any]]:
    return pq.read_table(path).to_pylist()
