"""What the report reads: this run's runs and fits, the corpus's entropy floor, MoE routing,
and the archs' fitted frontiers at shared compute budgets.

Every number the report shows comes from here or from stages/reporting/findings.py; nothing
is a constant of the paper except its own columns (stages/reporting/document.py).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd

from stages.common.inputs import InputError, require
from stages.data.kinds import TARGETS
from stages.scaling.runs import split_experts

log = logging.getLogger(__name__)


class ReportError(InputError, ValueError):
    """An input of the report is missing or unusable; the message names it."""


def load_inputs(results: Path) -> tuple[pd.DataFrame, dict]:
    runs_path, fits_path = results / "runs.parquet", results / "fits.json"
    require(runs_path, "grid", "the runs table")
    require(fits_path, "fit", "the fits")
    runs = pd.read_parquet(runs_path)
    runs = runs[runs.status == "ok"].copy()
    if runs.empty:
        raise ReportError(f"{runs_path} has no run with status ok")
    split_experts(runs)  # a sweep's expert counts are archs of their own, as in fits.json
    return runs, json.loads(fits_path.read_text())


def load_sparsity(results: Path) -> dict:
    """The sparsity-aware MoE laws (results/sparsity.json; {} without a sweep of experts)."""
    path = results / "sparsity.json"
    return json.loads(path.read_text()) if path.exists() else {}


def routings(points: Path, runs: pd.DataFrame) -> dict[str, dict]:
    """Per MoE arch, the routing of its largest model at its largest budget (written by
    flows/training/point.py)."""
    out = {}
    for arch, r in runs[runs.moe.astype(bool)].groupby("arch", sort=False):
        top = r.sort_values(["N", "D"]).iloc[-1]
        path = points / top.point_id / "routing.json"
        if path.exists():
            out[str(arch)] = json.loads(path.read_text())
        else:
            log.warning("%s: no routing.json for point %s (trained before it was recorded)",
                        arch, top.point_id)  # fmt: skip
    return out


def equal_compute_table(fits: dict, archs: list[str], n: int = 3) -> pd.DataFrame:
    """Loss on each arch's fitted frontier L = c_coef C^c at ``n`` shared compute budgets."""
    rows = []
    for target in TARGETS:
        fs = {a: fits[f"{a}/{target}"] for a in archs if f"{a}/{target}" in fits}
        fs = {a: f for a, f in fs.items() if f.get("c") is not None}
        if not fs:
            continue
        lo = max(f["C_min"] for f in fs.values())
        hi = min(f["C_max"] for f in fs.values())
        if lo >= hi:  # no shared range: the middle of the union
            lo = hi = math.sqrt(
                min(f["C_min"] for f in fs.values()) * max(f["C_max"] for f in fs.values())
            )
        for C in np.geomspace(lo, hi, n):
            for a, f in fs.items():
                rows.append({"target": target, "C": float(C), "arch": a,
                             "loss": f["c_coef"] * C ** f["c"]})  # fmt: skip
    return pd.DataFrame(rows, columns=["target", "C", "arch", "loss"])
