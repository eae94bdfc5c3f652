"""Where a data stage's per-file tasks run: a local pool of processes, or a Ray cluster.

A stage splits its work into independent tasks (one per input file), each writing its own
deterministically named outputs and returning a small summary (manifest rows, counts by
reason). :func:`run_tasks` runs them and returns the summaries in task order, so what a stage
writes and reports depends neither on the engine nor on the number of workers.

- ``local`` (``data.engine: local``): ``workers`` processes on this machine (one: in this
  process, for tests and debugging).
- ``ray`` (``data.engine: ray``, ``data.address``: the head, e.g. ``127.0.0.1:6379``, or
  ``auto``): the same tasks as Ray tasks. A task whose worker or node is lost is run again
  (``max_retries``), as is one that failed with an ``OSError`` (a storage hiccup); a task
  rewrites the same outputs, so a retry loses and duplicates nothing. The cluster's nodes need
  this repository at the same path (as a shared checkout or image): its modules are found
  through ``PYTHONPATH``; object-storage credentials come from each node's environment. A task
  runs in the stage's working directory (the repository under ``dvc repro``), so a relative
  path means what it means to the stage, not to the directory its node was started from; a
  node without that directory fails the task with :class:`WorkdirMissing`, never a retry.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any, TypeVar

from tqdm import tqdm

from stages.common.paths import ROOT

R = TypeVar("R")
ENGINES = ("local", "ray")
RAY_RETRIES = 3  # runs of a task whose worker died or that raised an OSError
log = logging.getLogger(__name__)


class WorkdirMissing(RuntimeError):
    """A Ray node lacks the stage's working directory (not an OSError: never retried)."""


def _in_dir(cwd: str, fn: Callable[..., R], *args: Any) -> R:
    """``fn(*args)`` in ``cwd`` (a Ray task: the driver's working directory, on any node)."""
    if not os.path.isdir(cwd):
        raise WorkdirMissing(
            f"node {socket.gethostname()} has no directory {cwd}, where the stage runs: the "
            "Ray engine runs each task there, so that relative paths mean the stage's files; "
            "run the stage from a directory every node has at the same path (the repository, "
            "as dvc repro does)"
        )
    os.chdir(cwd)
    return fn(*args)


def run_tasks(
    fn: Callable[..., R],
    tasks: Sequence[tuple],
    engine: str = "local",
    address: str | None = None,
    workers: int | None = None,
    desc: str = "tasks",
) -> list[R]:
    """``[fn(*t) for t in tasks]``, run by ``engine`` (module docstring), with a progress bar."""
    if engine not in ENGINES:
        raise ValueError(f"data.engine={engine!r}: allowed {', '.join(ENGINES)}")
    if engine == "ray":
        return _ray(fn, tasks, address, desc)
    workers = min(len(tasks), workers or os.cpu_count() or 1)
    if workers <= 1:
        return [fn(*t) for t in tqdm(tasks, desc=desc, unit="task", mininterval=2)]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(fn, *t) for t in tasks]
        for _ in tqdm(as_completed(futures), total=len(futures), desc=desc, unit="task",
                      mininterval=2):  # fmt: skip
            pass
        return [f.result() for f in futures]


def _ray(fn: Callable[..., R], tasks: Sequence[tuple], address: str | None, desc: str) -> list[R]:
    import ray

    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env["TOKENIZERS_PARALLELISM"] = "false"  # one thread per task
    ray.init(address=address or "auto", runtime_env={"env_vars": env}, log_to_driver=False,
             logging_level=logging.WARNING)  # fmt: skip
    try:
        remote = ray.remote(max_retries=RAY_RETRIES, retry_exceptions=[OSError])(_in_dir)
        remote = remote.options(name=getattr(fn, "__name__", "task"))  # (its process title)
        cwd = os.getcwd()
        refs = [remote.remote(cwd, fn, *t) for t in tasks]
        index = {ref: i for i, ref in enumerate(refs)}
        out: list[Any] = [None] * len(refs)
        pending = list(refs)
        with tqdm(total=len(refs), desc=f"{desc} (ray)", unit="task", mininterval=2) as bar:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                for ref in done:
                    out[index[ref]] = ray.get(ref)
                    bar.update()
        return out
    finally:
        ray.shutdown()
