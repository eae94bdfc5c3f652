"""The training loop of a segment: steps, divergence checks, metrics, periodic checkpoints.

:func:`advance` trains a :class:`flows.training.run.Run` up to a step, logging to a
``metrics.jsonl`` every ``log_every_steps`` steps the means since the last row
(:class:`MetricsLog`, which survives resume: rows past the restored step are dropped) and
evaluating every ``eval_every_steps``. The steps' losses stay on the device between log steps
(:class:`Window`) and are read once per row; before anything is written (a row, a checkpoint)
they are checked: a non-finite loss, or one above ``divergence_loss``, raises
:class:`Diverged` naming its step, and the point is recorded as failed.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from flows.devices import peak_flops
from flows.training import dist
from flows.training.checkpoints import Slot
from flows.training.evaluate import evaluate
from flows.training.run import Run
from flows.training.step import StepMetrics, train_step


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
    """The training loss went non-finite or above ``divergence_loss``."""


class Window:
    """The steps since the last metrics row: their losses on the device until :meth:`check`
    reads them (one sync for all of them), their times and FLOPs on the host."""

    def __init__(self, divergence_loss: float):
        self.limit = divergence_loss
        self.pending: list[tuple[int, StepMetrics]] = []
        self.loss, self.ce, self.aux, self.dt, self.flops, self.n = [], [], [], 0.0, 0.0, 0

    def add(self, step: int, m: StepMetrics, dt: float) -> None:
        self.pending.append((step, m))
        self.dt += dt
        self.flops += m.flops
        self.n += 1

    def check(self) -> None:
        """Read the pending losses; raise :class:`Diverged` at the first bad one."""
        if not self.pending:
            return
        moe = self.pending[0][1].aux is not None
        parts = [m.loss for _, m in self.pending] + [m.ce for _, m in self.pending]
        parts += [m.aux for _, m in self.pending] if moe else []
        values = torch.stack(parts).tolist()
        k = len(self.pending)
        steps = [s for s, _ in self.pending]
        self.pending = []
        for s, loss in zip(steps, values[:k], strict=True):
            if not math.isfinite(loss):
                raise Diverged(f"non-finite training loss ({loss}) at step {s}")
            if loss > self.limit:
                raise Diverged(f"training loss {loss:.3g} > train.divergence_loss at step {s}")
        self.loss += values[:k]
        self.ce += values[k : 2 * k]
        self.aux += values[2 * k :] if moe else [None] * k

    def flush(self, lr: float, batch_tokens: int, peak: float) -> dict[str, float]:
        """The means of the window's steps as a metrics row; the window starts again."""
        self.check()
        n, loss, aux = self.n, 0.0, 0.0
        for x in self.loss:  # (summed in step order, on the host)
            loss += x
        for x in self.aux:
            aux += x or 0.0
        row = {
            "train_loss": loss / n,
            "lr": lr,
            "tokens_per_s": n * batch_tokens / self.dt,
            "mfu": self.flops / self.dt / peak,
        }
        if self.aux and self.aux[-1] is not None:
            row["moe_aux_loss"] = aux / n
        self.last_ce = self.ce[-1]
        self.loss, self.ce, self.aux, self.dt, self.flops, self.n = [], [], [], 0.0, 0.0, 0
        return row


def advance(
    run: Run,
    until: int,
    lr_at: Callable[[int], float],
    ckpt: Slot,
    metrics: MetricsLog,
    save_at: dict[int, Slot] | None = None,
) -> float | None:
    """Train ``run`` up to step ``until`` (exclusive), checkpointing to ``ckpt`` every
    ``checkpoint_every_steps`` and to ``save_at[step]`` when the run passes ``step``
    (flows/training/checkpoints.py); every save is committed when it returns.

    Returns the cross-entropy of the last step trained (None if none was)."""
    cfg, save_at = run.cfg, save_at or {}
    peak = peak_flops(run.device, cfg.threads) * dist.world()  # (the global batch's devices)
    window = Window(cfg.divergence_loss)
    last = None
    while run.c.step < until:
        if run.c.step in save_at and not save_at[run.c.step].exists():
            window.check()
            run.save(save_at[run.c.step])
        s = run.c.step
        lr = lr_at(s)
        t0 = time.perf_counter()
        m = train_step(run, lr)
        window.add(s, m, time.perf_counter() - t0)
        evaluating = run.c.step % cfg.eval_every_steps == 0 and run.c.step < until
        if evaluating or run.c.step % cfg.log_every_steps == 0 or run.c.step == until:
            row = window.flush(lr, cfg.batch_tokens, peak)
            last = window.last_ce
            if evaluating:
                row |= evaluate(run).metrics
            metrics.log(run.c.step, run.c.tokens, row)
        if run.c.step % cfg.checkpoint_every_steps == 0:
            window.check()
            run.save(ckpt)
    if until in save_at and not save_at[until].exists():
        window.check()
        run.save(save_at[until])
    run.settle()  # (an asynchronous save: its commit)
    return last
