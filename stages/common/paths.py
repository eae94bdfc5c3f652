"""Where the repository is, and how a path argument is read: the one place both are decided."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository (its params.yaml, dvc.yaml, ...)


def resolve(path: str | Path) -> Path:
    """An argument path as an absolute one (``~`` expanded; relative to the working directory).
    A URL (``s3://bucket/shards``) is returned as it is, a string."""
    if "://" in str(path):
        return path  # type: ignore[return-value]
    return Path(path).expanduser().resolve()
