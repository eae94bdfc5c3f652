"""One point over several processes (``train.processes`` > 1: torchrun; DDP or FSDP2).

The grid launches such a point as ``torchrun --standalone --nproc_per_node=P -m flows.train``
(flows/launch.py); each rank packs the same global batch from the same seeded loader and
collates and trains on its share of the rows only (:func:`shard`), gloo on CPU, NCCL on GPUs,
one GPU per rank.
With ``train.sharding: none`` each rank holds the whole model, wrapped in
DistributedDataParallel; with ``fsdp`` (:func:`fully_shard_model`, FSDP2 as torchtitan applies
it) each block, then the rest of the model, is sharded over the ranks: parameters, gradients
and optimizer state split P ways, each block's parameters gathered for its forward and backward
(bf16 on GPUs, gradients reduced in fp32). The global batch is fixed, so 1 and P processes
train the same model: each rank's loss is its share of the batch's summed token loss over the
batch's *global* target count, and the MoE load-balancing statistics are all-reduced
(model/moe.py), so the ranks' objectives sum to the one-process objective and the average of
their gradients (DDP's all-reduce, FSDP's reduce-scatter), times P, is its gradient
(tests/flows/training/test_distributed.py: 2 processes equal 1 to 1e-5 over the first 10 steps,
for dense and MoE models, under DDP and under FSDP with activation checkpointing).

Rank 0 writes everything (checkpoints, metrics, records, routing); every rank reads the same
checkpoints, so a point killed under torchrun resumes exactly; :func:`barrier` after each write
the others may read. In one process (no torchrun) every function here is a no-op and the
training path is unchanged.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from stages.common.processes import die_with_parent


def world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if world() > 1 else 0


def writer() -> bool:
    """Whether this process writes the point's files (rank 0, or the only process)."""
    return rank() == 0


def setup() -> None:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1), once; pin the rank's
    GPU when there are GPUs. Nothing without torchrun."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return
    # Linux: this rank is killed when torchrun dies (torchrun starts its ranks in sessions of
    # their own, so a kill of torchrun's process group would leave them training)
    die_with_parent(signal.SIGKILL)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")


def teardown() -> None:
    global _checkpoint_group
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _checkpoint_group = None


def barrier() -> None:
    if world() > 1:
        dist.barrier()


def all_sum(x: torch.Tensor) -> torch.Tensor:
    """The sum over the ranks of a tensor without gradient (the tensor itself in one process)."""
    if world() == 1:
        return x
    out = x.detach().clone()
    dist.all_reduce(out)
    return out


def world_mismatch(processes: int) -> str | None:
    """Why this process group cannot train a run config planned for ``processes`` ranks (its
    micro-batches split the batch that many ways), or None."""
    if world() == processes:
        return None
    return (
        f"its run config has processes={processes} but {world()} process(es) started it: launch "
        "it with train.processes ranks in all (torchrun --nnodes x --nproc-per-node, or srun tasks)"
    )


def shard(rows: int) -> tuple[int, int]:
    """This rank's rows [start, stop) of a global batch of ``rows``."""
    w, r = world(), rank()
    if rows % w:
        raise ValueError(
            f"a batch of {rows} rows does not split over train.processes={w} processes: "
            "choose processes that divide the batch rows (train.batch_rows_ref and the sizes)"
        )
    n = rows // w
    return r * n, (r + 1) * n


def agree(flag: bool) -> bool:
    """Rank 0's ``flag`` on every rank: a decision read from the disk (does this checkpoint
    exist yet?) that rank 0 may already be changing while another rank reads it."""
    if world() == 1:
        return flag
    nccl = dist.get_backend() == "nccl"  # NCCL broadcasts CUDA tensors only
    t = torch.tensor([int(flag)], device=f"cuda:{torch.cuda.current_device()}" if nccl else "cpu")
    dist.broadcast(t, src=0)
    return bool(t.item())


def decide(obj: Any) -> Any:
    """Rank 0's ``obj`` (picklable) on every rank: which checkpoint to read, say."""
    if world() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


T = TypeVar("T")


class RankZeroFailed(RuntimeError):
    """What the other ranks raise when rank 0's part of a collective step failed."""


def on_writer(fn: Callable[[], T]) -> T:
    """``fn()`` run on rank 0 alone (reading or writing the checkpoint store, say), its result on
    every rank. If it raised there, it raises on every rank: rank 0 its own error, the others
    :class:`RankZeroFailed` naming it (else they would wait in the next collective until the job's
    timeout)."""
    if world() == 1:
        return fn()
    out: tuple[bool, Any] = (True, None)
    error: BaseException | None = None
    if writer():
        try:
            out = (True, fn())
        except Exception as e:  # noqa: BLE001 (every rank hears of it, then raises)
            error, out = e, (False, f"{type(e).__name__}: {e}")
    ok, value = decide(out)
    if ok:
        return value
    if error is not None:
        raise error
    raise RankZeroFailed(f"rank 0 failed: {value}")


_checkpoint_group = None


def checkpoint_group() -> Any:
    """A gloo process group of its own for asynchronous checkpoint writes (their collectives
    run in a background thread, beside the training's), made once; None in one process."""
    global _checkpoint_group
    if world() > 1 and _checkpoint_group is None:
        _checkpoint_group = dist.new_group(backend="gloo")
    return _checkpoint_group


def fully_shard_model(model: torch.nn.Module) -> None:
    """FSDP2 over this process group, in place: each block of each block stack
    (``model.transformers()``), then the root (embeddings, output head, the image path's
    projections). On GPUs the gathered parameters are bf16 and gradients are reduced in fp32;
    on CPU both stay fp32. Every rank then runs every module in every pass
    (``every_parameter_every_pass``), whatever its rows hold: a module one rank skipped would
    leave the others waiting in its collectives."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    gpu = dist.get_backend() == "nccl"
    mp = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16 if gpu else None, reduce_dtype=torch.float32 if gpu else None
    )
    model.every_parameter_every_pass = True
    for stack in model.transformers():
        for block in stack.blocks:
            fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
