"""The runs table a fit reads: any table of runs, checked and normalised to long form.

:func:`load_runs` reads a .csv, .tsv or .parquet table (the grid's ``results/runs.parquet`` as it
is) and :func:`prepare_runs` turns it into rows of arch, target, N, D, loss, C: the columns a
fit needs (stages/scaling/fit.py). A table that cannot be fitted raises :class:`FitError`
naming the columns or values at fault.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from stages.common.inputs import InputError

log = logging.getLogger(__name__)

REQUIRED = ("N", "D", "loss")
DEFAULT_ARCH = DEFAULT_TARGET = "all"


class FitError(InputError, ValueError):
    """The runs table cannot be fitted; the message names the arch/target or the columns."""


def prepare_runs(df: pd.DataFrame) -> pd.DataFrame:
    """Check and normalise a runs table to long form: arch, target, N, D, loss, C.

    Accepted: columns N, D, loss (required) and arch, target, C, N_v, D_v (optional); or, instead
    of ``loss``/``target``, one column ``loss_<target>`` per target (e.g. loss_caption, loss_avg).
    A missing arch or target is ``all``. Without ``C``: C = 6(N D + N_v D_v) (paper Sec. 3.1),
    where a missing N_v, D_v (early fusion rows of a mixed table) counts as 0. The grid's
    results/runs.parquet fits as is: rows whose ``status`` is not ``ok`` are dropped, and when
    its ``mixture`` column has several values each mixture is its own arch, ``<arch>-<mixture>``
    (paper Table 3 fits each mixture separately).
    """
    df = df.copy()
    if "status" in df.columns:
        ok = df["status"].astype(str) == "ok"
        if (~ok).any():
            log.warning("dropped %d run(s) whose status is not ok", int((~ok).sum()))
        df = df[ok]
    columns = ["arch", "target", "N", "D", "loss", "C"]
    if "arch" in df.columns:
        df["arch"] = df["arch"].astype(str)
    columns += split_experts(df)
    several_mixtures = "mixture" in df.columns and df["mixture"].nunique() > 1
    if several_mixtures:
        arch = df["arch"] if "arch" in df.columns else DEFAULT_ARCH
        df["base_arch"] = arch
        df["arch"] = arch + "-" + df["mixture"].astype(str)
        columns += ["base_arch", "mixture"]
        if "moe_arch" in df.columns:
            df["moe_arch"] = df["moe_arch"].where(
                df["moe_arch"].isna(), df["moe_arch"] + "-" + df["mixture"].astype(str)
            )
    wide = [c for c in df.columns if isinstance(c, str) and c.startswith("loss_")]
    if "loss" not in df.columns and wide:
        if "target" in df.columns:
            raise FitError("runs table has both a target column and loss_<target> columns")
        keep = [c for c in df.columns if c not in wide]
        df = df.melt(id_vars=keep, value_vars=wide, var_name="target", value_name="loss")
        df["target"] = df["target"].str.removeprefix("loss_")
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise FitError(
            f"runs table lacks column(s) {', '.join(missing)}: required N, D, loss (or "
            f"loss_<target>); optional arch, target, C, N_v, D_v; it has {', '.join(map(str, df.columns))}"
        )
    for col, default in (("arch", DEFAULT_ARCH), ("target", DEFAULT_TARGET)):
        df[col] = df[col].astype(str) if col in df.columns else default
    numeric = [c for c in ("N", "D", "loss", "C", "N_v", "D_v") if c in df.columns]
    for col in numeric:
        try:
            df[col] = pd.to_numeric(df[col]).astype(float)
        except (ValueError, TypeError):
            raise FitError(f"runs table column {col} is not numeric") from None
    if "C" not in df.columns:
        vision = [c for c in ("N_v", "D_v") if c in df.columns]
        if len(vision) == 1:
            raise FitError(
                f"runs table has {vision[0]} but not its pair: late-fusion C needs N_v and D_v"
            )
        extra = df.N_v.fillna(0) * df.D_v.fillna(0) if vision else 0.0
        df["C"] = 6 * (df.N * df.D + extra)
    return df[columns]


def split_experts(df: pd.DataFrame) -> list[str]:
    """MoE runs of several expert counts (``n_experts``, ``top_k``, or ``sparsity`` S = 1 -
    top_k/n_experts): each count is its own arch, ``<arch>-e<n>``, for the (N, D) laws; the
    columns ``moe_arch`` (the arch they share) and ``sparsity`` feed the sparsity-aware law
    (stages/scaling/sparsity.py). Changes ``df`` in place; returns the columns it added (none
    without expert counts)."""
    if "n_experts" not in df.columns and "sparsity" not in df.columns:
        return []
    for col in ("n_experts", "top_k", "sparsity"):
        if col in df.columns:
            try:
                df[col] = pd.to_numeric(df[col]).astype(float)
            except (ValueError, TypeError):
                raise FitError(f"runs table column {col} is not numeric") from None
    if "sparsity" not in df.columns:
        top_k = df["top_k"] if "top_k" in df.columns else 1.0
        df["sparsity"] = 1.0 - top_k / df["n_experts"]
    bad = df["sparsity"].notna() & ~df["sparsity"].between(0.0, 1.0, inclusive="left")
    if bad.any():
        raise FitError(f"runs table: {int(bad.sum())} run(s) with a sparsity outside [0, 1)")
    if "n_experts" not in df.columns:
        df["n_experts"] = np.nan
    arch = df["arch"] if "arch" in df.columns else pd.Series(DEFAULT_ARCH, index=df.index)
    moe = df["sparsity"].notna()
    df["moe_arch"] = arch.where(moe, None)
    counts = df[moe].groupby(arch[moe])["sparsity"].nunique()
    swept = moe & arch.isin(counts[counts > 1].index)
    arch = arch.astype(object)
    for i in df.index[swept]:
        n, s = df.at[i, "n_experts"], df.at[i, "sparsity"]
        arch.at[i] = f"{arch.at[i]}-e{int(n)}" if pd.notna(n) else f"{arch.at[i]}-S{s:.4g}"
    df["arch"] = arch.astype(str)
    return ["moe_arch", "sparsity", "n_experts"]


def load_runs(path: str | Path) -> pd.DataFrame:
    """Read a runs table (.csv, .tsv or .parquet) and :func:`prepare_runs` it."""
    path = Path(path)
    if not path.exists():
        raise FitError(f"runs table {path} not found")
    if path.suffix == ".csv":
        df = pd.read_csv(path)
    elif path.suffix == ".tsv":
        df = pd.read_csv(path, sep="\t")
    elif path.suffix in (".parquet", ".pq"):
        df = pd.read_parquet(path)
    else:
        raise FitError(
            f"runs table {path}: unknown format {path.suffix!r} (allowed .csv, .tsv, .parquet)"
        )
    return prepare_runs(df)
