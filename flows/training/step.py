"""The training step: one optimizer step of a point on its global batch, in any number of
processes and passes.

One process is a world of one (flows/training/dist.py: its all-reduces return their input), so
there is one step path. Every rank packs the same global batch from the same seeded loader and
collates, decodes and trains on its own share of the rows (stages/data/loader.py ``rows``),
``train.micro_batch_rows`` at a time (gradient accumulation:
a forward and backward per pass, one optimizer step); each pass's loss is its rows' summed
token loss over the batch's *global* target count, so the passes' and ranks' losses sum to the
global batch's, and the average of their gradients (DDP, FSDP), times the number of ranks, is
the global batch's gradient (in one process and one pass every factor is exactly 1: the numbers
are those of a plain step). The MoE auxiliary loss is taken over each pass's rows (all ranks'
statistics, model/moe.py) and averaged over the passes: with several passes it is not the one
pass's balancing loss over the whole batch (as in torchtitan and Megatron).

The step returns its metrics as device tensors (:class:`StepMetrics`); nothing here waits for
the device (the target and image counts come from the batch on the host). The loop
(flows/training/loop.py) reads them at its log steps.

Test hook (fault injection): the environment variable ``NMM_TEST_NAN_AT``, a JSON mapping
``{point_id: step}``, forces that point's loss to NaN at that step (:func:`fault_step`, read by
the point when it starts: flows/training/point.py). It is never a parameter of the flow.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

import torch

from flows.training import dist
from flows.training.run import Run
from model.counting import step_flops

FAULT_ENV = "NMM_TEST_NAN_AT"


def fault_step(point_id: str | None) -> int | None:
    """The step at which ``$NMM_TEST_NAN_AT`` asks this point's loss to be NaN (tests only)."""
    raw = os.environ.get(FAULT_ENV)
    return json.loads(raw).get(point_id) if raw and point_id else None


@dataclass
class StepMetrics:
    """One step's numbers: device tensors until someone reads them, and host counts."""

    loss: torch.Tensor  # what was minimised (cross-entropy + MoE auxiliary loss), global batch
    ce: torch.Tensor  # the cross-entropy on text targets, global batch
    aux: torch.Tensor | None  # the MoE auxiliary loss (None for a dense model)
    flops: float  # model FLOPs of the step (model/counting.py step_flops)


def train_step(run: Run, lr: float) -> StepMetrics:
    """One optimizer step of ``run`` at learning rate ``lr`` (its counters advance by one)."""
    t0 = time.perf_counter()
    batch = run.loader.next_batch()  # this rank's rows of the global batch
    whole = run.loader.totals  # the global batch's rows, text targets and images
    n_targets = whole.targets  # (on the host: no device sync)
    stop = batch.tokens.shape[0]
    passes = range(0, stop, run.cfg.micro_batch_rows)  # gradient accumulation, if several
    for g in run.opt.param_groups:
        g["lr"] = lr * g["lr_mult"]
    data = time.perf_counter() - t0
    parts = None
    for i, a in enumerate(passes):
        t1 = time.perf_counter()
        mine = batch.rows(a, min(a + run.cfg.micro_batch_rows, stop)).to(run.device)
        data += time.perf_counter() - t1
        with run.no_sync(last=i == len(passes) - 1):
            with torch.autocast("cuda", torch.bfloat16, enabled=run.device.type == "cuda"):
                out = run.forward(mine)
            n = torch.tensor(float(n_targets), dtype=torch.float64, device=out.loss.device)
            # (rows without a text target add 0: the model divides by max(n, 1))
            share = out.loss * (out.n_targets / n.clamp(min=1)).to(out.loss.dtype)
            # the MoE auxiliary loss is over each pass's rows (on every rank): their mean
            aux = out.aux_loss / len(passes) if len(passes) > 1 else out.aux_loss
            loss = share + aux
            if run.c.step == run.fault_at:
                loss = loss * float("nan")
            (loss * dist.world()).backward()
        mine_parts = torch.stack([loss.detach(), share.detach(), aux.detach()])
        parts = mine_parts if parts is None else parts + mine_parts
    parts = dist.all_sum(parts)
    torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.cfg.grad_clip)
    run.opt.step()
    run.opt.zero_grad(set_to_none=True)

    cfg, c = run.cfg.model, run.c
    run.timing["data"] += data
    dt = time.perf_counter() - t0 - data
    c.train_seconds += dt
    run.timing["steps"] += dt
    c.step += 1
    c.tokens += whole.rows * batch.tokens.shape[1]
    c.image_tokens += whole.images * cfg.image_tokens
    c.text_targets += n_targets
    flops = step_flops(cfg, whole.rows, batch.tokens.shape[1], n_targets, whole.images)
    c.flops += flops
    return StepMetrics(parts[0], parts[1], parts[2] if out.moe else None, flops)
