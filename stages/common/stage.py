"""Helpers every stage entry point uses: logging set-up, fresh output directories, atomic
writes, and one process per data kind."""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import TypeVar

R = TypeVar("R")


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")


def atomic_write(path: str | Path, data: bytes | str) -> None:
    """Write ``path`` so that a reader (or a kill) never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)


def fresh_dir(path: str | Path) -> Path:
    """An empty output directory (stale files from an earlier run would end up in the outs)."""
    path = Path(path)
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def run_per_kind(
    fn: Callable[..., R], jobs: Sequence[tuple], workers: int | None = None
) -> list[R]:
    """Run ``fn(*job)`` for independent jobs (one per data kind) in parallel processes.

    Each job writes its own files, so the result does not depend on the number of workers.
    ``workers=1`` (or one job) runs in this process, which keeps tests and debugging simple.
    """
    workers = min(len(jobs), workers or os.cpu_count() or 1)
    if workers <= 1:
        return [fn(*job) for job in jobs]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(fn, *job) for job in jobs]
        return [f.result() for f in futures]
