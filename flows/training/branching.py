"""Cooldown branching: the points of a group share one constant-lr trunk (Hägele et al. 2024).

The points of one *group* (same architecture, size, mixture and seed; different token budgets)
share their warmup and constant-lr phase. The group's *trunk* is trained once, with a
checkpoint ``branch-<step>`` at each budget's cooldown start; each budget then branches from
its checkpoint and gets its own cooldown. A branched point is the same computation as a
separately trained one (tests/flows/training/test_point.py checks it), at a fraction of the cost of the
D-sweep. A budget added after the trunk went past its cooldown start replays the trunk to it
from the start, aside (``trunk-replay-<step>``).

Every checkpoint carries the fingerprint of the code that wrote it. The group's directory is
named by its group id, which already includes that fingerprint; still, a checkpoint written by
other code (or by a version that did not record one) is never branched from: it is deleted and
the trunk is trained again (:func:`drop_stale`). A checkpoint that no longer opens is set aside:
a branch checkpoint is made again, a trunk resumes from the checkpoint before
(flows/training/checkpoints.py). The checkpoints live in the group's folder of the checkpoint
store (``train.checkpoint_store``): on a shared store, a chain resubmitted on another machine
resumes its trunk where it was.
"""

from __future__ import annotations

import logging
from pathlib import Path

from flows.training import dist
from flows.training.checkpoints import Slot, Store, Version
from flows.training.loop import MetricsLog, advance
from flows.training.run import Run

log = logging.getLogger(__name__)


def drop_stale(store: Store, fingerprint: str) -> list[str]:
    """Delete the checkpoints in the group's folder ``store`` written by code other than
    ``fingerprint``; set aside those that no longer read (flows/training/checkpoints.py
    :meth:`Slot.newest_readable`). Rank 0 reads and deletes; the others wait (and raise if it
    failed)."""

    def drop() -> list[str]:
        stale = []
        for slot in store_slots(store):
            while (v := slot.newest_readable()) is not None and v.meta()[0] != fingerprint:
                log.warning("%s was written by other code: not branched from, deleted", v.url)
                store.remove(v.name)
                stale.append(v.name)
        return stale

    return dist.on_writer(drop)


def store_slots(store: Store) -> list[Slot]:
    return [Slot(store, name) for name in sorted(store.slot_names())]


def trunk(run: Run, gdir: Path, store: Store) -> Version:
    """The group's trunk checkpoint at ``run``'s cooldown start, trained here if it is missing
    (resuming the trunk from its latest checkpoint). ``gdir``: the group's local folder (its
    metrics); ``store``: the group's folder of the checkpoint store."""
    gdir.mkdir(parents=True, exist_ok=True)
    drop_stale(store, run.code["fingerprint"])
    sched = run.cfg.schedule
    cs = sched.cooldown_start
    branch = Slot(store, f"branch-{cs:08d}")
    if (found := branch.resumable()) is not None:
        return found
    latest = Slot(store, "trunk-latest")
    resume = latest.resumable()
    if resume is not None and resume.step > cs:  # a budget added after the trunk went by:
        latest = Slot(store, f"trunk-replay-{cs:08d}")  # replay it to its cooldown start, aside
        resume = latest.resumable()
    if resume is not None:
        run.load(resume)
    # every budget of the group gets its checkpoint as the trunk passes it
    save_at = {s: Slot(store, f"branch-{s:08d}") for s in run.cfg.branch_steps if s >= run.c.step}
    metrics = MetricsLog(gdir / "metrics.jsonl", run.c.step)
    advance(run, cs, sched.trunk_lr, latest, metrics, save_at)
    run.save(latest)
    run.settle()
    found = branch.resumable()
    assert found is not None, f"{branch} was just written"
    return found
