"""Cooldown branching: the points of a group share one constant-lr trunk (Hägele et al. 2024).

The points of one *group* (same architecture, size, mixture and seed; different token budgets)
share their warmup and constant-lr phase. The group's *trunk* is trained once, with a
checkpoint ``branch-<step>.pt`` at each budget's cooldown start; each budget then branches from
its checkpoint and gets its own cooldown. A branched point is the same computation as a
separately trained one (tests/flows/training/test_point.py checks it), at a fraction of the cost of the
D-sweep. A budget added after the trunk went past its cooldown start replays the trunk to it
from the start, aside (``trunk-replay-<step>.pt``).

Every checkpoint carries the fingerprint of the code that wrote it. The group's directory is
named by its group id, which already includes that fingerprint; still, a checkpoint written by
other code (or by a version that did not record one) is never branched from: it is deleted and
the trunk is trained again (:func:`drop_stale`). A checkpoint that no longer opens is set aside:
a branch checkpoint is made again, a trunk resumes from the checkpoint before
(flows/training/run.py :func:`resumable`).
"""

from __future__ import annotations

import logging
from pathlib import Path

from flows.training import dist
from flows.training.loop import MetricsLog, advance
from flows.training.run import Run, checkpoint_meta, readable, resumable

log = logging.getLogger(__name__)


def drop_stale(gdir: Path, fingerprint: str) -> list[Path]:
    """Delete the checkpoints in ``gdir`` written by code other than ``fingerprint``; set aside
    those that no longer open (flows/training/run.py :func:`readable`)."""
    paths = sorted(gdir.glob("*.pt"))
    dist.barrier()  # several processes: every rank has listed them before rank 0 moves one
    stale = [p for p in paths if readable(p) and checkpoint_meta(p)[0] != fingerprint]
    dist.barrier()  # several processes: every rank has read the files before rank 0 deletes
    for p in stale if dist.writer() else []:
        log.warning("%s was written by other code: not branched from, deleted", p)
        p.unlink()
    dist.barrier()
    return stale


def trunk(run: Run, gdir: Path) -> Path:
    """The group's trunk checkpoint at ``run``'s cooldown start, trained here if it is missing
    (resuming the trunk from its latest checkpoint)."""
    gdir.mkdir(parents=True, exist_ok=True)
    drop_stale(gdir, run.code["fingerprint"])
    sched = run.cfg.schedule
    cs = sched.cooldown_start
    branch = gdir / f"branch-{cs:08d}.pt"
    if readable(branch):
        return branch
    latest = gdir / "trunk-latest.pt"
    resume = resumable(latest)
    if resume is not None and checkpoint_meta(resume)[1] > cs:  # a budget added after the
        latest = gdir / f"trunk-replay-{cs:08d}.pt"  # trunk went by: replay it to it, aside
        resume = resumable(latest)
    if resume is not None:
        run.load(resume)
    # every budget of the group gets its checkpoint as the trunk passes it
    save_at = {s: gdir / f"branch-{s:08d}.pt" for s in run.cfg.branch_steps if s >= run.c.step}
    metrics = MetricsLog(gdir / "metrics.jsonl", run.c.step)
    advance(run, cs, sched.trunk_lr, latest, metrics, save_at)
    run.save(latest)
    return branch
