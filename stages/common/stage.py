"""Helpers every stage entry point uses: the entry point's wrapper (logging, errors a user can
fix printed without a traceback), fresh output directories, atomic writes, and one process per
data kind."""

from __future__ import annotations

import argparse
import functools
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import TypeVar

from stages.common.inputs import InputError

R = TypeVar("R")
log = logging.getLogger(__name__)


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")


def entry_point(main: Callable[[list[str] | None], int]) -> Callable[[list[str] | None], int]:
    """A stage's ``main(argv)`` with logging set up, and an :class:`InputError` (a bad params
    file, a missing or stale input) logged as its message with exit code 2."""

    @functools.wraps(main)
    def run(argv: list[str] | None = None) -> int:
        setup_logging()
        try:
            return main(argv)
        except InputError as e:
            log.error("%s", e)
            return 2

    return run


def parser(doc: str, **paths: str) -> argparse.ArgumentParser:
    """A stage's command line: its docstring's first line, ``--params`` and one option per path
    (``corpus="data/corpus"`` -> ``--corpus``, defaulting to it)."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--params", default="params.yaml", help="the study (default %(default)s)")
    for name, default in paths.items():
        ap.add_argument(f"--{name}", default=default, help="(default %(default)s)")
    return ap


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
