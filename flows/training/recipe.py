"""The training recipe of one point: schedule, model config and optimizer, all from params.

Recipe (paper §2.1 and App. B): decoupled AdamW (β1 0.9, β2 ``adam_beta2``; the paper's 0.95),
weight decay, gradient clipping,
linear warmup, constant learning rate, then a cooldown over the last ``cooldown_fraction`` of
the steps to 0 with the 1-sqrt shape (Hägele et al. 2024, arXiv 2405.18392). Learning rate,
batch size and warmup are functions of N (params ``train``, OLMo-ladder style), never per-point
constants: lr = lr_ref·(N/n_ref)^lr_exponent, rows = batch_rows_ref·(N/n_ref)^batch_exponent
(a power of two), warmup = warmup_tokens_ref·(N/n_ref)^warmup_exponent tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from model.archs import variant
from model.config import ModelConfig, MoEConfig
from model.ladder import size_config
from stages.params import Params, TrainParams

if TYPE_CHECKING:
    from flows.plan import Point
    from model.model import MultimodalLM


@dataclass(frozen=True)
class Schedule:
    """Batch, lr and step counts of one point, all derived from N (params ``train``)."""

    batch_rows: int
    lr: float  # peak
    warmup_steps: int
    steps: int
    cooldown_start: int
    shape: str = "wsd"  # wsd (warmup, stable, 1-sqrt decay) | cosine

    def trunk_lr(self, step: int) -> float:
        """Warmup then constant: the lr of the shared trunk."""
        return self.lr * min(1.0, (step + 1) / max(1, self.warmup_steps))

    def lr_at(self, step: int) -> float:
        """wsd: the trunk lr, then 1-sqrt cooldown from its value at ``cooldown_start`` to 0;
        cosine: warmup, then a half cosine from the peak to 0 over the remaining steps."""
        if self.shape == "cosine":
            if step < self.warmup_steps:
                return self.trunk_lr(step)
            frac = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
            return self.lr * 0.5 * (1.0 + math.cos(math.pi * frac))
        if step < self.cooldown_start:
            return self.trunk_lr(step)
        frac = (step - self.cooldown_start) / max(1, self.steps - self.cooldown_start)
        return self.trunk_lr(self.cooldown_start) * (1.0 - math.sqrt(frac))


def schedule(tokens: int, n: int, tp: TrainParams, context: int, moe: bool = False) -> Schedule:
    scale = n / tp.n_ref
    rows = 2 ** max(0, round(math.log2(max(1.0, tp.batch_rows_ref * scale**tp.batch_exponent))))
    batch_tokens = rows * context
    steps = max(2, round(tokens / batch_tokens))
    warmup_tokens = tp.warmup_tokens_ref * scale**tp.warmup_exponent
    warmup_tokens *= tp.moe_warmup_mult if moe else 1.0
    warmup = max(1, math.ceil(warmup_tokens / batch_tokens))
    cooldown = max(1, round(tp.cooldown_fraction * steps))
    lr = tp.lr_ref * scale**tp.lr_exponent
    return Schedule(rows, lr, warmup, steps, steps - cooldown, tp.schedule)


def model_config(
    point: Point, params: Params, info: dict[str, Any], codebook_size: int
) -> ModelConfig:
    """The point's model: its variant (model/archs.py) at its ladder size, shaped by the shards'
    ``info.json`` (vocabulary, image and patch size, special token ids)."""
    mp = params.model
    moe = MoEConfig(
        n_experts=mp.n_experts,
        top_k=mp.top_k,
        aux_loss_weight=mp.aux_loss_weight,
        z_loss_weight=mp.z_loss_weight,
    )
    base = ModelConfig(
        vocab_size=info["vocab_size"],
        context_length=params.data.context_length,
        image_size=info["image_size"],
        patch_size=info["patch_size"],
        codebook_size=codebook_size,
        special_ids=info["special_ids"],
        enc_lr_mult=mp.enc_lr_mult,
    )
    return size_config(point.size, variant(point.arch).config(base, moe))


def build_optimizer(model: MultimodalLM, sched: Schedule, tp: TrainParams) -> torch.optim.AdamW:
    """Decoupled AdamW: the decay per step is weight_decay·lr_t/lr_peak (not lr_t·wd), applied to
    matrices only; late fusion's encoder runs at ``enc_lr_mult`` times the decoder's lr."""
    decoder, vision = model.parameter_groups()
    groups = []
    for params, mult in ((decoder, 1.0), (vision, model.cfg.enc_lr_mult)):
        peak = sched.lr * mult
        decay = [p for p in params if p.ndim >= 2]
        rest = [p for p in params if p.ndim < 2]
        groups += [
            {"params": decay, "weight_decay": tp.weight_decay / peak, "lr_mult": mult},
            {"params": rest, "weight_decay": 0.0, "lr_mult": mult},
        ]
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=sched.lr, betas=(0.9, tp.adam_beta2), eps=1e-8)
