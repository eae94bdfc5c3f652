"""One point's training state: model, optimizer, loader and counters, built from its run config
and checkpointable.

fp32 with pinned threads on CPU; bf16 autocast (and optionally ``torch.compile``) on GPU; over
several processes DDP or FSDP2 (flows/training/dist.py). A checkpoint holds the model and the
optimizer (keyed by parameter name: it resumes at any process count), the loader's state (a few
integers) and the counters, plus the fingerprint of the code that wrote it (flows/plan.py) and
the git revision; :meth:`Run.load` refuses a checkpoint written by other code
(:class:`StaleCheckpoint`). Where checkpoints are kept, their two formats (one file written by
rank 0, or DCP shards written by every rank, optionally asynchronously) and which one a resume
reads (a truncated one is set aside, the one before is read, with the same numbers) are
flows/training/checkpoints.py. The step is flows/training/step.py, evaluation
flows/training/evaluate.py.
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from flows.config import RunConfig
from flows.devices import check_attention, choose_device
from flows.training import dist
from flows.training.checkpoints import STATE, Slot, Version
from model.model import MultimodalLM
from stages.common.inputs import StaleInput, how_to_make, require
from stages.data.loader import PackedLoader
from stages.data.shard_format import is_url

log = logging.getLogger(__name__)


class StaleCheckpoint(RuntimeError):
    """A checkpoint written by other code (or before checkpoints carried a fingerprint)."""


@dataclass
class Counters:
    step: int = 0
    tokens: int = 0  # decoder tokens
    image_tokens: int = 0
    text_targets: int = 0
    flops: float = 0.0  # model FLOPs done (model/counting.py step_flops)
    train_seconds: float = 0.0


def build_optimizer(model: MultimodalLM, cfg: RunConfig) -> torch.optim.AdamW:
    """Decoupled AdamW: the decay per step is weight_decay·lr_t/lr_peak (not lr_t·wd), applied to
    matrices only; late fusion's encoder runs at ``enc_lr_mult`` times the decoder's lr."""
    decoder, vision = model.parameter_groups()
    groups = []
    for params, mult in ((decoder, 1.0), (vision, cfg.model.enc_lr_mult)):
        peak = cfg.schedule.lr * mult
        decay = [p for p in params if p.ndim >= 2]
        rest = [p for p in params if p.ndim < 2]
        groups += [
            {"params": decay, "weight_decay": cfg.weight_decay / peak, "lr_mult": mult},
            {"params": rest, "weight_decay": 0.0, "lr_mult": mult},
        ]
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=cfg.schedule.lr, betas=(0.9, cfg.adam_beta2), eps=1e-8)


class Run:
    """Model, optimizer, loader and counters of one point (``cfg``), on this process's device.

    ``code``: ``{"fingerprint": ..., "git_revision": ...}`` of the code that trains it, saved in
    its checkpoints. ``fault_at``: a step whose loss is forced to NaN (tests only:
    flows/training/step.py ``fault_step``)."""

    def __init__(self, cfg: RunConfig, shards: Path, codebook: Path | None, code: dict[str, str]):
        t0 = time.perf_counter()
        # where this process's wall time went (seconds; per process, never checkpointed)
        self.timing = dict.fromkeys(("build", "data", "steps", "eval", "checkpoint"), 0.0)
        self.cfg, self.shards, self.code = cfg, shards if is_url(shards) else Path(shards), code
        self.fault_at: int | None = None
        cb = None
        if cfg.model.arch == "discrete":
            from model.discrete import VisualCodebook

            require(codebook or "(none given)", "codebook", f"arch {cfg.point.arch}'s codebook")
            cb = VisualCodebook.from_file(codebook)
            if cb.size != cfg.model.codebook_size:
                raise StaleInput(
                    f"{codebook} has {cb.size} codes but codebook.n_codes is "
                    f"{cfg.model.codebook_size}: remake it with {how_to_make('codebook')}"
                )
        self.device = choose_device(cfg.device)
        if dist.world() > 1 and self.device.type == "cuda":  # this rank's GPU (dist.setup)
            self.device = torch.device("cuda", torch.cuda.current_device())
        torch.manual_seed(cfg.point.seed)
        self.model = MultimodalLM(cfg.model, cb).to(self.device)
        self.model.set_activation_checkpointing(cfg.activation_checkpointing)
        check_attention(cfg.attention, self.device.type)  # before any work
        self.model.set_attention(cfg.attention, compiled=cfg.compile)
        self.forward = self.model
        self.ddp = None
        if dist.world() > 1 and cfg.sharding == "fsdp":  # sharded: flows/training/dist.py
            dist.fully_shard_model(self.model)
        elif dist.world() > 1:  # one replica per process (torchrun): flows/training/dist.py
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            # a rank whose rows hold no image leaves the image path without gradients
            self.ddp = DDP(self.model, device_ids=ids, find_unused_parameters=True)
            self.forward = self.ddp
        self.opt = build_optimizer(self.model, cfg)  # (over the sharded parameters, if sharded)
        self.loader = PackedLoader(
            shards, cfg.schedule.batch_rows, cfg.context_length, cfg.mixture, seed=cfg.point.seed,
            workers=cfg.loader_workers, prefetch=cfg.loader_prefetch,
            rows=dist.shard(cfg.schedule.batch_rows),  # this rank's rows
        )  # fmt: skip
        self.c = Counters()
        self.pending: tuple | None = None  # a save whose commit waits (:meth:`settle`)
        if self.device.type == "cuda" and cfg.compile:
            self.forward = torch.compile(self.forward)
        self.timing["build"] = time.perf_counter() - t0

    def no_sync(self, last: bool) -> contextlib.AbstractContextManager:
        """Around a pass's forward and backward: DDP's gradient all-reduce waits for the last
        pass of a step (gradient accumulation); FSDP reduce-scatters every pass (its gradients
        stay sharded), one process has nothing to sync."""
        return self.ddp.no_sync() if self.ddp is not None and not last else contextlib.nullcontext()

    def save(self, slot: Slot) -> None:
        """A new version of ``slot`` at this step (flows/training/checkpoints.py); every rank
        takes part. ``full``: the whole state, gathered to rank 0, which writes it; ``sharded``:
        DCP, each rank its shards, then rank 0 commits. A slot that already holds this step
        is left as it is (training is deterministic: the same state)."""
        self.settle()
        t0 = time.perf_counter()
        step = self.c.step
        if dist.on_writer(lambda: any(v.step == step for v in slot.versions())):
            return
        sharded = self.cfg.checkpoint_format == "sharded"
        name = slot.version_name(step, sharded)
        state = {"loader": self.loader.state_dict(), "counters": asdict(self.c), "code": self.code}
        if not sharded:
            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            model, opt = get_state_dict(self.model, self.opt, options=opts)

            def write() -> None:
                buf = io.BytesIO()
                torch.save({"model": model, "opt": opt, **state}, buf)
                slot.store.write(name, buf.getvalue())
                slot.prune()

            dist.on_writer(write)  # (every rank waits for it, and raises if it failed)
            self.timing["checkpoint"] += time.perf_counter() - t0
            return
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

        dist.on_writer(lambda: slot.store.remove(name))  # (an uncommitted one of a run killed here)
        model, opt = get_state_dict(self.model, self.opt)  # (sharded under FSDP)
        writer = FsspecWriter(f"{slot.store.url}/{name}")
        buf = io.BytesIO()
        torch.save(state, buf)
        commit = (slot, name, buf.getvalue())
        with warnings.catch_warnings():  # ("torch.distributed is disabled": one process)
            warnings.filterwarnings("ignore", "torch.distributed is disabled")
            self._write_shards(writer, {"model": model, "opt": opt}, commit)
        self.timing["checkpoint"] += time.perf_counter() - t0
        if not self.cfg.checkpoint_async:
            self.settle()  # (the commit)

    def _write_shards(self, writer: Any, tensors: dict[str, Any], commit: tuple) -> None:
        import torch.distributed.checkpoint as dcp

        one = dist.world() == 1
        if self.cfg.checkpoint_async:
            pg = dist.checkpoint_group()
            future = dcp.async_save(tensors, storage_writer=writer, process_group=pg, no_dist=one)
            self.pending = (future, commit)
        else:
            dcp.save(tensors, storage_writer=writer, no_dist=one)
            self.pending = (None, commit)

    def settle(self) -> None:
        """Finish the save under way, if any: wait for its shards, then rank 0 commits it
        (``state.pt``) and prunes the slot; every rank waits for the commit."""
        if self.pending is None:
            return
        t0 = time.perf_counter()
        future, (slot, name, state) = self.pending
        self.pending = None
        if future is not None:
            future.result()
        dist.barrier()  # every rank's shards are written

        def commit() -> None:
            slot.store.write(f"{name}/{STATE}", state)
            slot.prune()

        dist.on_writer(commit)  # (every rank waits for the commit, and raises if it failed)
        self.timing["checkpoint"] += time.perf_counter() - t0

    def abandon(self) -> None:
        """On the way out after an error: wait for an asynchronous save's writes still under
        way (so that the process does not end in the middle of them), never commit it (an
        uncommitted version is never read, and the next save of its slot removes it)."""
        if self.pending is None:
            return
        future, (slot, name, _) = self.pending
        self.pending = None
        if future is None:
            return
        try:
            future.result()
        except Exception as e:  # noqa: BLE001 (the error that brought us here matters more)
            log.warning("the asynchronous save of %s/%s failed too: %s", slot, name, e)

    def load(self, version: Version) -> None:
        """Resume from ``version`` of either format, at any process count; one written by
        other code is refused (:class:`StaleCheckpoint`)."""
        self.settle()
        t0 = time.perf_counter()
        state = version.state()
        theirs = (state.get("code") or {}).get("fingerprint")
        if theirs != self.code["fingerprint"]:
            raise StaleCheckpoint(
                f"{version.url} was written by other code (fingerprint {theirs}, this code "
                f"{self.code['fingerprint']})"
            )
        if version.sharded:
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

            model, opt = get_state_dict(self.model, self.opt)
            tensors = {"model": model, "opt": opt}
            with warnings.catch_warnings():  # ("torch.distributed is disabled": one process)
                warnings.filterwarnings("ignore", "torch.distributed is disabled")
                dcp.load(
                    tensors, storage_reader=FsspecReader(version.url), no_dist=dist.world() == 1
                )
            set_state_dict(self.model, self.opt, model_state_dict=tensors["model"],
                           optim_state_dict=tensors["opt"])  # fmt: skip
        else:
            set_state_dict(
                self.model,
                self.opt,
                model_state_dict=state["model"],
                optim_state_dict=state["opt"],
                options=StateDictOptions(full_state_dict=True),
            )
        self.loader.load_state_dict(state["loader"])
        self.c = Counters(**state["counters"])
        self.timing["checkpoint"] += time.perf_counter() - t0
