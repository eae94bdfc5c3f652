"""One training segment of a point: model, optimizer, loader and counters, checkpointable.

fp32 with pinned threads on CPU; bf16 autocast (and optionally ``torch.compile``) on GPU.
A checkpoint holds the model, the optimizer, the loader's state (a few integers) and the
counters, plus the fingerprint of the code that wrote it (flows/plan.py) and the git revision;
:meth:`Run.load` refuses a checkpoint written by other code (:class:`StaleCheckpoint`).
Evaluation is the validation loss per data kind on fixed held-out rows and their average, with
the images blanked, and per word role and entity rank on the synthetic world (:meth:`evaluate`).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import torch

from flows.devices import choose_device
from flows.plan import Point
from flows.training import dist
from flows.training.recipe import build_optimizer, model_config, schedule
from model.archs import variant
from model.counting import count_params, step_flops
from model.model import MultimodalLM
from stages.data.kinds import KINDS
from stages.data.loader import PackedLoader, val_batches
from stages.data.shard_format import NAME, ROLES, VALUE, load_info
from stages.params import Params

EVAL_ROWS = 8  # rows per validation batch: the same held-out rows for every point


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


class Run:
    """Model, optimizer, loader and counters of one training segment of ``point``."""

    def __init__(
        self,
        point: Point,
        params: Params,
        shards: Path,
        codebook: Path | None,
        code: dict[str, str],
    ):
        t0 = time.perf_counter()
        # where this process's wall time went (seconds; per process, never checkpointed)
        self.timing = dict.fromkeys(("build", "data", "steps", "eval", "checkpoint"), 0.0)
        self.point, self.params, self.shards = point, params, Path(shards)
        self.code = code  # {"fingerprint": ..., "git_revision": ...}, saved in checkpoints
        info = load_info(shards)
        cb = None
        if variant(point.arch).base == "discrete":
            from model.discrete import VisualCodebook

            if codebook is None or not Path(codebook).exists():
                raise FileNotFoundError("arch 'discrete' needs data/codebook/codebook.pt")
            cb = VisualCodebook.from_file(codebook)
        self.cfg = model_config(point, params, info, cb.size if cb is not None else 256)
        self.counts = count_params(self.cfg)
        self.sched = schedule(
            point.tokens,
            self.counts.N,
            params.train,
            params.data.context_length,
            self.cfg.moe is not None,
        )
        self.device = choose_device(params.train.device)
        if dist.world() > 1 and self.device.type == "cuda":  # this rank's GPU (dist.setup)
            self.device = torch.device("cuda", torch.cuda.current_device())
        torch.manual_seed(point.seed)
        self.model = MultimodalLM(self.cfg, cb).to(self.device)
        self.opt = build_optimizer(self.model, self.sched, params.train)
        mixture = params.grid.mixtures[point.mixture].as_dict()
        self.loader = PackedLoader(
            shards, self.sched.batch_rows, params.data.context_length, mixture, seed=point.seed
        )
        self.c = Counters()
        self.forward = self.model
        if dist.world() > 1:  # one point over several processes (torchrun): flows/training/dist.py
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            # a rank whose rows hold no image leaves the image path without gradients
            self.forward = DDP(self.model, device_ids=ids, find_unused_parameters=True)
        if self.device.type == "cuda" and params.train.compile:
            self.forward = torch.compile(self.forward)
        self.timing["build"] = time.perf_counter() - t0

    # --- checkpoints
    def save(self, path: Path) -> None:
        """Rank 0 writes (every rank holds the same state); the others wait for the file."""
        if not dist.writer():
            dist.barrier()
            return
        t0 = time.perf_counter()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        state = {
            "model": self.model.state_dict(),
            "opt": self.opt.state_dict(),
            "loader": self.loader.state_dict(),
            "counters": asdict(self.c),
            "code": self.code,
        }
        torch.save(state, tmp)
        tmp.replace(path)  # atomic: a kill never leaves half a checkpoint
        self.timing["checkpoint"] += time.perf_counter() - t0
        dist.barrier()

    def load(self, path: Path) -> None:
        t0 = time.perf_counter()
        state = torch.load(path, map_location=self.device, weights_only=True)
        theirs = (state.get("code") or {}).get("fingerprint")
        if theirs != self.code["fingerprint"]:
            raise StaleCheckpoint(
                f"{path} was written by other code (fingerprint {theirs}, this code "
                f"{self.code['fingerprint']})"
            )
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])
        self.loader.load_state_dict(state["loader"])
        self.c = Counters(**state["counters"])
        self.timing["checkpoint"] += time.perf_counter() - t0

    # --- one optimizer step
    def step(self, lr: float, fail: bool = False) -> float:
        if dist.world() > 1:
            return self._step_distributed(lr, fail)
        t0 = time.perf_counter()
        batch = self.loader.next_batch().to(self.device)
        for g in self.opt.param_groups:
            g["lr"] = lr * g["lr_mult"]
        t1 = time.perf_counter()
        self.timing["data"] += t1 - t0
        with torch.autocast("cuda", torch.bfloat16, enabled=self.device.type == "cuda"):
            out = self.forward(batch)
        loss = out.total
        if fail:
            loss = loss * float("nan")
        value = loss.item()
        if math.isfinite(value):
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.params.train.grad_clip)
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self._count(batch, t1, int(out.n_targets))
        self.last_loss = out.loss.item()
        self.last_aux = float(out.aux_loss.detach()) if out.moe else None
        return value

    def _step_distributed(self, lr: float, fail: bool) -> float:
        """:meth:`step` on this rank's rows of the global batch (flows/training/dist.py): the
        loss over the batch's global target count, so the ranks' losses sum to the global
        batch's; DDP averages the gradients, so each rank's objective is scaled by the ranks."""
        t0 = time.perf_counter()
        batch = self.loader.next_batch()  # every rank draws the same global batch
        start, stop = dist.shard(batch.tokens.shape[0])
        mine = batch.rows(start, stop).to(self.device)
        for g in self.opt.param_groups:
            g["lr"] = lr * g["lr_mult"]
        t1 = time.perf_counter()
        self.timing["data"] += t1 - t0
        with torch.autocast("cuda", torch.bfloat16, enabled=self.device.type == "cuda"):
            out = self.forward(mine)
        n = dist.all_sum(out.n_targets.detach().to(torch.float64))
        # (a rank whose rows hold no text target adds 0: the model divides by max(n, 1))
        share = out.loss * (out.n_targets / n.clamp(min=1)).to(out.loss.dtype)
        loss = share + out.aux_loss
        if fail:
            loss = loss * float("nan")
        parts = dist.all_sum(torch.stack([loss.detach(), share.detach(), out.aux_loss.detach()]))
        value = float(parts[0])
        if math.isfinite(value):
            (loss * dist.world()).backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.params.train.grad_clip)
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self._count(batch, t1, int(n))
        self.last_loss = float(parts[1])
        self.last_aux = float(parts[2]) if out.moe else None
        return value

    def _count(self, batch, t1: float, n_targets: int) -> None:
        """The counters after a step of the (global) ``batch`` with ``n_targets`` text targets."""
        dt = time.perf_counter() - t1
        self.c.train_seconds += dt
        self.timing["steps"] += dt
        self.c.step += 1
        self.c.tokens += batch.tokens.numel()
        self.c.image_tokens += len(batch.images) * self.cfg.image_tokens
        self.c.text_targets += n_targets
        self.last_flops = step_flops(self.cfg, *batch.tokens.shape, n_targets, len(batch.images))
        self.c.flops += self.last_flops

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation loss per kind on fixed held-out rows, and their average (paper §2.1).

        Also ``val_{kind}_noimage`` (the same rows with every image blanked: how much of the
        images the model uses) and, on data with word tags (the synthetic world), the loss per
        word role ``val_{kind}_{role}`` and per entity-rank decade of name and value tokens
        ``val_{role}_rank1e{b}`` (ranks in (10^(b-1), 10^b], all kinds together).
        """
        t0 = time.perf_counter()
        self.model.eval()
        sums: dict[str, list[float]] = {}

        def add(key: str, losses: torch.Tensor) -> None:
            acc = sums.setdefault(key, [0.0, 0])
            acc[0] += float(losses.sum())
            acc[1] += losses.numel()

        ctx, n = self.params.data.context_length, self.params.train.eval_batches
        # MoE: image and text tokens per expert and layer (routing_table); none for dense models
        self.routing = [{"image": 0.0, "text": 0.0} for _ in range(self.cfg.n_layers)]
        for kind in KINDS:
            for b in islice(val_batches(self.shards, kind, EVAL_ROWS, ctx), n):
                b = b.to(self.device)
                o = self._forward_eval(b)
                add(f"val_{kind}", o.token_loss)
                if len(b.images):
                    blank = dataclasses.replace(b, images=torch.zeros_like(b.images))
                    add(f"val_{kind}_noimage", self._forward_eval(blank).token_loss)
                tags = b.target_tags[b.loss_mask.bool()]
                if bool(tags.any()):
                    role, rank = tags % len(ROLES), tags // len(ROLES)
                    for i, r in enumerate(ROLES):
                        add(f"val_{kind}_{r}", o.token_loss[role == i])
                    decade = torch.ceil(torch.log10(rank.clamp(min=1).double())).long()
                    for i in (NAME, VALUE):
                        for d in decade[(role == i) & (rank > 0)].unique().tolist():
                            sel = (role == i) & (rank > 0) & (decade == d)
                            add(f"val_{ROLES[i]}_rank1e{d}", o.token_loss[sel])
                if self.cfg.moe is not None:
                    n_img = len(b.images) * self.cfg.image_tokens
                    n_txt = b.tokens.numel() - n_img
                    for acc, layer in zip(self.routing, o.moe, strict=True):
                        acc["image"] = acc["image"] + layer["image_frac"].float().cpu() * n_img
                        acc["text"] = acc["text"] + layer["text_frac"].float().cpu() * n_txt
        out = {k: s / c for k, (s, c) in sums.items() if c}
        per_kind = [out[f"val_{k}"] for k in KINDS if f"val_{k}" in out]
        if per_kind:
            out["val_avg"] = sum(per_kind) / len(per_kind)
        self.model.train()
        self.timing["eval"] += time.perf_counter() - t0
        return out

    def _forward_eval(self, batch):
        with torch.autocast("cuda", torch.bfloat16, enabled=self.device.type == "cuda"):
            return self.model(batch, per_token=True)

    def routing_table(self) -> dict[str, Any]:
        """After :meth:`evaluate` of a MoE model: per layer, the share of the validation image
        tokens and of the text tokens that each expert received (paper Figs. 12-13)."""
        layers = []
        for acc in self.routing:
            img, txt = (torch.as_tensor(acc[k], dtype=torch.float64) for k in ("image", "text"))
            layers.append(
                {
                    "image": (img / img.sum().clamp(min=1e-12)).tolist(),
                    "text": (txt / txt.sum().clamp(min=1e-12)).tolist(),
                    "image_tokens": float(img.sum()),
                    "text_tokens": float(txt.sum()),
                }
            )
        return {"arch": self.point.arch, "size": self.point.size, "layers": layers}
