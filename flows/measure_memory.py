"""The plan's memory estimate against a measured training step, on this machine.

    python -m flows.measure_memory --config results/points/<id>/config.json --shards data/shards
    torchrun --standalone --nproc-per-node=8 -m flows.measure_memory --config ... --shards ...

builds the point of a run config (as its training would: processes, sharding, activation
checkpointing, micro-batches, device), trains ``--steps`` steps (the first ones create the
optimizer's state) and measures the peak of each of the last two on every rank (the larger
counts): on a GPU the
allocator's ``max_memory_allocated``; on a CPU what is live before the step (this rank's
parameters and optimizer state, its shards under FSDP) plus the peak of what the step
allocates: in one process from the profiler's memory events (:func:`profiled_peak`), over
several from glibc's heap statistics sampled during the step (:func:`sampled_peak`). It prints
one JSON object: the estimate (flows/memory.py, per device), each rank's measured peak and
their ratio. Nothing is written; the weights are random.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import sys
import threading
from pathlib import Path
from typing import Any

import torch

from flows.config import RunConfig
from flows.memory import estimate
from flows.training import dist
from flows.training.run import Run
from flows.training.step import train_step
from stages.common.inputs import InputError
from stages.common.paths import resolve
from stages.common.stage import setup_logging


def _local_bytes(t: torch.Tensor) -> int:
    """Bytes this process holds of ``t`` (its shard, for a sharded DTensor)."""
    local = t.to_local() if hasattr(t, "to_local") else t
    return local.numel() * local.element_size()


def live_bytes(run: Run) -> int:
    """This rank's parameters and optimizer state (gradients are freed after a step)."""
    total = sum(_local_bytes(p) for p in run.model.parameters())
    for state in run.opt.state.values():
        total += sum(_local_bytes(v) for v in state.values() if torch.is_tensor(v))
    return total


def step_peak(run: Run) -> int:
    """Peak bytes of one training step on this rank (see the module docstring)."""
    if run.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        train_step(run, run.cfg.schedule.lr)
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated())
    if dist.world() > 1 and _mallinfo2() is not None:
        return live_bytes(run) + sampled_peak(run)
    return live_bytes(run) + profiled_peak(run)


def profiled_peak(run: Run) -> int:
    """The peak of one step's allocations over what was live before it, from the profiler's
    memory events: exact, but only those of this thread (torch reports a tensor's allocation
    and free to the profiler of the thread that makes it)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        train_step(run, run.cfg.schedule.lr)
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")  # fmt: skip
    now = peak = 0
    for _, nbytes in events:
        now += nbytes
        peak = max(peak, now)
    return peak


def sampled_peak(run: Run) -> int:
    """The peak of one step's heap over what was in use before it, every thread's: glibc's
    ``mallinfo2`` (bytes in use, heap and mmap), read in a loop by a second thread while the
    step runs. Under FSDP with gloo the communication threads free buffers the training thread
    allocated, which the profiler never sees (:func:`profiled_peak` then only grows); in one
    process both agree within 1% (measured: 19.3/19.4, 77.1/77.0, 182.1/180.7 MiB)."""
    info = _mallinfo2()
    in_use = lambda: (m := info()).uordblks + m.hblkhd  # noqa: E731
    base = in_use()
    peak, done = [base], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], in_use())

    t = threading.Thread(target=sample, daemon=True)
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # the sampler gets the GIL between the step's Python lines
    t.start()
    try:
        train_step(run, run.cfg.schedule.lr)
    finally:
        done.set()
        t.join()
        sys.setswitchinterval(switch)
    return peak[0] - base


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]  # fmt: skip


def _mallinfo2():
    """glibc's ``mallinfo2`` (2.33 and later), or None elsewhere."""
    try:
        f = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    f.restype = _MallInfo2
    return f


def measure(cfg: RunConfig, shards: Path, steps: int = 3) -> dict[str, Any]:
    """Estimate and measured peaks (every rank's, gathered; call it on every rank)."""
    run = Run(cfg, shards, None, {"fingerprint": "measure", "git_revision": ""})
    for _ in range(steps - 2):
        train_step(run, cfg.schedule.lr)
    # the larger of the last two steps' peaks: a sampled peak can only fall short of the true
    # one (the other threads' frees and allocations race the sampler)
    peak = max(step_peak(run) for _ in range(2))
    peaks = [peak]
    if dist.world() > 1:
        peaks = [None] * dist.world()
        torch.distributed.all_gather_object(peaks, peak)
    precision = "bf16" if run.device.type == "cuda" else "fp32"
    est = estimate(cfg, precision=precision)
    return {
        "point": cfg.point.label,
        "device": run.device.type,
        "processes": dist.world(),
        "sharding": cfg.sharding,
        "activation_checkpointing": cfg.activation_checkpointing,
        "micro_batch_rows": cfg.micro_batch_rows,
        "estimate_gib": est.gib,
        "estimate_parts_gib": {k: v / 2**30 for k, v in est.as_dict().items() if k != "precision"},
        "measured_gib": [p / 2**30 for p in peaks],
        "estimate_over_measured": [est.total / p for p in peaks],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m flows.measure_memory", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("--config", required=True, help="a point's run config (config.json)")
    ap.add_argument("--shards", required=True, help="the shards directory it trains on")
    ap.add_argument("--steps", type=int, default=3,
                    help="steps to train, at least 2 (the last two are measured)")  # fmt: skip
    args = ap.parse_args(argv)
    if args.steps < 2:
        ap.error(f"--steps {args.steps}: at least 2 (the last two steps are measured)")
    setup_logging()
    dist.setup()
    writer = dist.writer()
    try:
        cfg = RunConfig.from_json(Path(args.config).read_text())
        if why := dist.world_mismatch(cfg.processes):
            raise ValueError(why)
        out = measure(cfg, resolve(args.shards), args.steps)
    except (OSError, ValueError, InputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        dist.teardown()
    if writer:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
