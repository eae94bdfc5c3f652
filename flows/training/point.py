"""Train one grid point to its end, or resume it, and write its record.

A point trains in three segments: the group's shared trunk (flows/training/branching.py), its
own cooldown (flows/training/loop.py), then a final evaluation. Trunk and branch save
checkpoints every ``checkpoint_every_steps``; a point killed and restarted continues from its
last checkpoint and ends with the same metrics as an uninterrupted run.

Its record, ``results/points/<point_id>/record.json`` (layout: flows/records.py), holds its
coordinates, model shape, schedule, final validation losses, token and FLOP counts, timings,
status (``ok`` or ``failed`` with the reason), the fingerprint of the code that trained it, the
git revision and its run config (``config``). Final losses per fit target are ``loss_<kind>``
and ``loss_avg``; the evaluation's breakdowns (images blanked, per word role, per entity rank)
are ``eval_*``. MoE points also write ``routing.json``. A point whose record says ``ok`` is
returned as is, never trained again.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from flows import records
from flows.config import RunConfig
from flows.devices import cpu_kernels, peak_flops
from flows.plan import CODE, fingerprints, group_id, point_id
from flows.training import dist
from flows.training.branching import trunk
from flows.training.checkpoints import Slot, checkpoint_store
from flows.training.evaluate import evaluate
from flows.training.loop import Diverged, MetricsLog, advance, read_jsonl
from flows.training.run import Run
from flows.training.step import fault_step
from model.archs import variant
from model.counting import training_compute
from stages.common.inputs import require
from stages.common.provenance import git_revision
from stages.data.kinds import KINDS, TARGETS
from stages.data.shard_format import join

log = logging.getLogger(__name__)


class PlanMismatch(RuntimeError):
    """The point's id here differs from the one its caller planned (code or data changed)."""


def train_point(
    cfg: RunConfig,
    *,
    shards: Path,
    codebook: Path | None,
    workdir: Path,
    expect_id: str | None = None,
    startup_s: float | None = None,
) -> dict[str, Any]:
    """Train (or resume) the point of ``cfg``; return its record (see the module docstring).

    ``expect_id``: the id the grid planned; a different id here (the code or the data changed
    since) raises :class:`PlanMismatch` before any work. ``startup_s``: the seconds this
    process took to get here (interpreter and imports), recorded as ``time_startup_s``.
    """
    workdir = Path(workdir)
    dist.setup()  # under torchrun (train.processes > 1): join the point's process group
    if why := dist.world_mismatch(cfg.processes):
        raise PlanMismatch(f"{cfg.point.label}: {why}")
    fp = fingerprints(shards, codebook)
    pid, gid = point_id(cfg, fp), group_id(cfg, fp)
    if pid is None:
        require(join(shards, "manifest.parquet"), "shards", "the shards' manifest")
    if expect_id is not None and pid != expect_id:
        raise PlanMismatch(
            f"{cfg.point.label}: planned as {expect_id} but its id is now {pid}: the code or the "
            "data changed since the grid planned it; launch the grid again"
        )
    done = records.read_record(workdir, pid)
    if records.is_done(done):
        return done
    pdir = records.point_dir(workdir, pid)
    pdir.mkdir(parents=True, exist_ok=True)
    wall0 = time.perf_counter()
    if cfg.device != "cuda" and not torch.cuda.is_available():
        torch.set_num_threads(cfg.threads)
    code = {"fingerprint": fp.code(cfg.point.arch), "git_revision": str(git_revision(paths=CODE))}
    run = Run(cfg, shards, codebook, code)
    run.fault_at = fault_step(pid)
    rec: dict[str, Any] = _describe(run, pid, gid)
    store = checkpoint_store(cfg.checkpoint_store, workdir)
    latest = Slot(store / "points" / pid, "latest")
    resume = latest.resumable()  # (one that no longer reads is set aside: the one before)
    if resume is not None and dist.on_writer(lambda: resume.meta()[0] != code["fingerprint"]):
        if dist.writer():
            log.warning("%s was written by other code: not resumed, deleted", resume.url)
        dist.on_writer(latest.clear)  # (every rank waits for it, and raises if it failed)
        resume = None
    try:
        if resume is not None:  # resume this point's own segment
            run.load(resume)
            metrics = MetricsLog(pdir / "metrics.jsonl", run.c.step)
        else:
            trunk_rows: list[dict] = []
            if cfg.branch_cooldowns:  # (never with a cosine schedule: validated)
                gdir = workdir / "groups" / gid
                run.load(trunk(run, gdir, store / "groups" / gid))
                trunk_rows = list(read_jsonl(gdir / "metrics.jsonl"))
            metrics = MetricsLog(pdir / "metrics.jsonl", run.c.step, trunk_rows)
        sched = cfg.schedule
        rec["train_loss"] = advance(run, sched.steps, sched.lr_at, latest, metrics)
        final = evaluate(run)
        metrics.log(run.c.step, run.c.tokens, final.metrics)
        if final.routing is not None and dist.writer():
            routing = {"arch": cfg.point.arch, "size": cfg.point.size, **final.routing}
            (pdir / "routing.json").write_text(json.dumps(routing))
        for k, v in final.metrics.items():  # the fit targets as loss_*, the breakdowns as eval_*
            name = k.removeprefix("val_")
            rec[f"loss_{name}" if name in TARGETS else f"eval_{name}"] = v
        rec["status"], rec["error"] = "ok", None
    except Diverged as e:
        rec["status"], rec["error"] = "failed", str(e)
        log.warning("point %s failed: %s", pid, e)
    finally:
        run.abandon()  # (an asynchronous save still writing, after an error: its writes end)
        run.loader.close()  # (its reader processes, if any)
    rec |= _totals(run, time.perf_counter() - wall0, startup_s)
    if not dist.writer():  # rank 0 records the point
        return rec
    records.write_record(workdir, pid, rec)
    if rec["status"] == "ok":
        latest.clear()
    return rec


def _describe(run: Run, pid: str, gid: str) -> dict[str, Any]:
    cfg = run.cfg
    p, v, m, s = cfg.point, variant(cfg.point.arch), cfg.model, cfg.schedule
    return {
        "point_id": pid,
        "group_id": gid,
        "code_fingerprint": run.code["fingerprint"],
        "git_revision": run.code["git_revision"],
        "arch": p.arch,
        "arch_base": v.base,
        "moe": v.moe,
        "modality_aware": v.modality_aware,
        "size": p.size,
        "tokens_budget": p.tokens,
        "mixture": p.mixture,
        "seed": p.seed,
        "width": m.d_model,
        "depth": m.n_layers,
        "N": cfg.counts.N,
        "N_v": cfg.counts.N_v,
        "N_total": cfg.counts.N_total,
        "batch_rows": s.batch_rows,
        "lr": s.lr,
        "steps": s.steps,
        "branch_step": s.cooldown_start,
        "device": str(run.device),
        "cpu_kernels": cpu_kernels(),
        "processes": dist.world(),
        **cfg.moe_fields(),
        **{f"loss_{k}": None for k in (*KINDS, "avg")},
        "train_loss": None,
        "config": cfg.to_dict(),
    }


def _totals(run: Run, wall: float, startup_s: float | None) -> dict[str, Any]:
    """Counts and timings. ``time_*_s``: where this process's wall went (build: model,
    optimizer, loader; data: next batches; steps: forward, backward, optimizer; eval;
    checkpoint: saves and loads; other: the rest, e.g. metrics and the record)."""
    c, cfg = run.c, run.cfg
    train_s = max(c.train_seconds, 1e-9)
    timing = {f"time_{k}_s": v for k, v in run.timing.items()}
    timing["time_other_s"] = max(0.0, wall - sum(run.timing.values()))
    timing["time_startup_s"] = startup_s
    # of time_data_s: waiting for shards to be read and their images decoded (all of that
    # reading without loader workers; with them, only what they had not done ahead)
    timing["data_wait_s"] = run.loader.wait_s
    return {
        **timing,
        "D": c.tokens,
        "D_image": c.image_tokens,
        "D_text": c.text_targets,
        "C": training_compute(cfg.model, c.tokens, c.image_tokens),
        "flops": c.flops,
        "wall_s": wall,
        "train_s": c.train_seconds,
        "tokens_per_s": c.tokens / train_s,
        # (several processes: the global batch's FLOPs on as many devices)
        "mfu": c.flops / train_s / peak_flops(run.device, cfg.threads) / dist.world(),
    }
