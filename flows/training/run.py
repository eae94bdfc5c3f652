"""One point's training state: model, optimizer, loader and counters, built from its run config
and checkpointable.

fp32 with pinned threads on CPU; bf16 autocast (and optionally ``torch.compile``) on GPU; over
several processes DDP or FSDP2 (flows/training/dist.py). A checkpoint holds the model and the
optimizer (whole, keyed by parameter name: it resumes at any process count), the loader's state
(a few integers) and the counters, plus the fingerprint of the code that wrote it
(flows/plan.py) and the git revision;
:meth:`Run.load` refuses a checkpoint written by other code (:class:`StaleCheckpoint`). A save
keeps the checkpoint it replaces (``<name>.prev.pt``); one that no longer opens (truncated by a
disk or copy fault) is set aside and the point resumes from the one before, or from the start,
with the same numbers (:func:`resumable`). The step is flows/training/step.py, evaluation
flows/training/evaluate.py.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from flows.config import RunConfig
from flows.devices import check_attention, choose_device
from flows.training import dist
from model.model import MultimodalLM
from stages.common.inputs import StaleInput, how_to_make, require
from stages.data.loader import PackedLoader

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


def checkpoint_meta(path: Path) -> tuple[str | None, int]:
    """(code fingerprint, step) of a checkpoint, without reading its tensors (mmap); the
    fingerprint is None for a checkpoint that did not record one."""
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return (state.get("code") or {}).get("fingerprint"), int(state["counters"]["step"])


def previous(path: Path) -> Path:
    """Where :meth:`Run.save` keeps the checkpoint that ``path`` held before its latest save."""
    return path.with_name(path.stem + ".prev" + path.suffix)


def readable(path: Path) -> bool:
    """Whether the checkpoint at ``path`` exists and opens: its archive's directory and its
    record of state read (a truncated file, from a disk or copy fault, fails here, not
    mid-resume: its directory is at the end), without reading the tensors (mmap). One that does
    not open is set aside as ``<name>.corrupt`` (kept for a look, never read again) and logged.
    Rank 0 reads and decides for every rank."""
    ok = False
    if dist.writer() and path.exists():
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            ok = isinstance(state, dict) and int(state["counters"]["step"]) >= 0
        except Exception as e:  # noqa: BLE001 (zip, pickle, EOF, key errors: all mean unreadable)
            aside = path.with_name(path.name + ".corrupt")
            path.replace(aside)
            log.warning("%s does not read (%s): set aside as %s", path, str(e)[:200], aside.name)
    return dist.agree(ok)


def resumable(path: Path) -> Path | None:
    """The checkpoint to resume from for ``path``: itself if it reads, else the one it replaced
    (:func:`previous`) if that reads, else None (start over); unreadable ones are set aside
    (:func:`readable`). Training is deterministic from any checkpoint, so resuming from an
    earlier one ends with the same numbers."""
    if readable(path):
        return path
    before = previous(path)
    if readable(before):
        log.warning("%s: resuming from the checkpoint before it, %s", path, before.name)
        return before
    return None


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
        self.cfg, self.shards, self.code = cfg, Path(shards), code
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
            shards, cfg.schedule.batch_rows, cfg.context_length, cfg.mixture, seed=cfg.point.seed
        )
        self.c = Counters()
        if self.device.type == "cuda" and cfg.compile:
            self.forward = torch.compile(self.forward)
        self.timing["build"] = time.perf_counter() - t0

    def no_sync(self, last: bool) -> contextlib.AbstractContextManager:
        """Around a pass's forward and backward: DDP's gradient all-reduce waits for the last
        pass of a step (gradient accumulation); FSDP reduce-scatters every pass (its gradients
        stay sharded), one process has nothing to sync."""
        return self.ddp.no_sync() if self.ddp is not None and not last else contextlib.nullcontext()

    def save(self, path: Path) -> None:
        """The whole state, gathered to rank 0 (under FSDP every rank takes part), which writes
        it; the others wait for the file. Model and optimizer state are keyed by parameter name,
        unsharded: a checkpoint resumes at any number of processes, sharded or not."""
        t0 = time.perf_counter()
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model, opt = get_state_dict(self.model, self.opt, options=opts)
        if not dist.writer():
            dist.barrier()
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        state = {
            "model": model,
            "opt": opt,
            "loader": self.loader.state_dict(),
            "counters": asdict(self.c),
            "code": self.code,
        }
        torch.save(state, tmp)
        if path.exists():  # the one before stays, in case this one is damaged later on disk
            path.replace(previous(path))
        tmp.replace(path)  # atomic: a kill never leaves half a checkpoint
        self.timing["checkpoint"] += time.perf_counter() - t0
        dist.barrier()

    def load(self, path: Path) -> None:
        t0 = time.perf_counter()
        state = torch.load(path, map_location="cpu", weights_only=True)
        theirs = (state.get("code") or {}).get("fingerprint")
        if theirs != self.code["fingerprint"]:
            raise StaleCheckpoint(
                f"{path} was written by other code (fingerprint {theirs}, this code "
                f"{self.code['fingerprint']})"
            )
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
