"""The training loop of a segment: steps, divergence checks, metrics, periodic checkpoints.

:func:`advance` trains a :class:`flows.training.run.Run` up to a step, logging to a
``metrics.jsonl`` every ``train.log_every_steps`` steps the means since the last row
(:class:`MetricsLog`, which survives resume: rows past the restored step are dropped) and
evaluating every ``train.eval_every_tokens``. A non-finite loss, or one above
``train.divergence_loss``, raises :class:`Diverged`: the point is recorded as failed.

Test hook (fault injection): the environment variable ``NMM_TEST_NAN_AT``, a JSON mapping
``{point_id: step}``, forces that point's loss to NaN at that step (:func:`fault_step`). It is
read from the environment of the point process, never a parameter of the flow.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from flows.devices import peak_flops
from flows.training import dist
from flows.training.run import Run

FAULT_ENV = "NMM_TEST_NAN_AT"


def fault_step(point_id: str) -> int | None:
    """The step at which ``$NMM_TEST_NAN_AT`` asks this point's loss to be NaN (tests only)."""
    raw = os.environ.get(FAULT_ENV)
    return json.loads(raw).get(point_id) if raw else None


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """Rows of a metrics.jsonl; a half-written last line (a killed writer) is skipped."""
    if not path.exists():
        return
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "step" in row:
            yield row


class MetricsLog:
    """A metrics.jsonl that survives resume: entries past the restored step are dropped."""

    def __init__(self, path: Path, upto_step: int, seed_rows: list[dict[str, Any]] | None = None):
        self.path = path
        if not dist.writer():  # one point over several processes: rank 0 keeps the log
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = seed_rows if seed_rows is not None else list(read_jsonl(path))
        kept = [r for r in rows if r["step"] <= upto_step]
        path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def log(self, step: int, tokens: int, metrics: dict[str, float]) -> None:
        if not dist.writer():
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, "tokens": tokens, **metrics}) + "\n")


class Diverged(RuntimeError):
    """The training loss went non-finite or above ``train.divergence_loss``."""


def advance(
    run: Run,
    until: int,
    lr_at: Callable[[int], float],
    ckpt: Path,
    metrics: MetricsLog,
    save_at: dict[int, Path] | None = None,
    fail_at: int | None = None,
) -> None:
    """Train ``run`` up to step ``until`` (exclusive), checkpointing to ``ckpt`` every
    ``train.checkpoint_every_steps`` and to ``save_at[step]`` when the run passes ``step``."""
    tp, save_at = run.params.train, save_at or {}
    batch_tokens = run.sched.batch_rows * run.params.data.context_length
    eval_every = max(1, round(tp.eval_every_tokens / batch_tokens))
    peak = peak_flops(run.device, tp.threads) * dist.world()  # (the global batch's devices)
    window = {"loss": 0.0, "dt": 0.0, "flops": 0.0, "aux": 0.0, "n": 0}
    while run.c.step < until:
        if run.c.step in save_at and dist.agree(not save_at[run.c.step].exists()):
            run.save(save_at[run.c.step])
        s = run.c.step
        lr = lr_at(s)
        t0 = time.perf_counter()
        loss = run.step(lr, fail=fail_at == s)
        dt = time.perf_counter() - t0
        if not math.isfinite(loss):
            raise Diverged(f"non-finite training loss ({loss}) at step {s}")
        if loss > tp.divergence_loss:
            raise Diverged(f"training loss {loss:.3g} > train.divergence_loss at step {s}")
        window["loss"] += loss
        window["dt"] += dt
        window["flops"] += run.last_flops
        window["aux"] += run.last_aux or 0.0
        window["n"] += 1
        evaluate = run.c.step % eval_every == 0 and run.c.step < until
        if evaluate or run.c.step % tp.log_every_steps == 0 or run.c.step == until:
            n = window["n"]  # the steps since the last row: their means
            m = {
                "train_loss": window["loss"] / n,
                "lr": lr,
                "tokens_per_s": n * batch_tokens / window["dt"],
                "mfu": window["flops"] / window["dt"] / peak,
            }
            if run.last_aux is not None:
                m["moe_aux_loss"] = window["aux"] / n
            if evaluate:
                m |= run.evaluate()
            metrics.log(run.c.step, run.c.tokens, m)
            window = dict.fromkeys(window, 0.0) | {"n": 0}
        if run.c.step % tp.checkpoint_every_steps == 0:
            run.save(ckpt)
    if until in save_at and dist.agree(not save_at[until].exists()):
        run.save(save_at[until])
