"""The run config: everything one grid point trains with, worked out once, in one object.

:meth:`RunConfig.build` turns the validated params and a point's coordinates into the model
(its variant at its ladder size, shaped by the shards' vocabulary and image geometry), the
counts (N, N_v, FLOPs per token: model/counting.py), the schedule (batch rows and tokens, peak
lr, warm-up, steps, cooldown start), the optimizer settings, the loop's cadence and where it
runs (processes, threads, device). Nothing else computes the recipe: the grid plans with it,
the point process receives it as JSON (:meth:`RunConfig.to_json`) and never reads params.yaml,
the record and the MLflow run store it, and ``python -m flows.grid plan`` prints it.

Recipe (paper §2.1 and App. B): decoupled AdamW (β1 0.9, β2 ``adam_beta2``; the paper's 0.95),
weight decay, gradient clipping, linear warm-up, constant learning rate, then a cooldown over
the last ``cooldown_fraction`` of the steps to 0 with the 1-sqrt shape (Hägele et al. 2024,
arXiv 2405.18392). Learning rate, batch size and warm-up are functions of N (params ``train``,
OLMo-ladder style), never per-point constants: lr = lr_ref·(N/n_ref)^lr_exponent (times the
arch's ``lr_arch_mult``), rows = batch_rows_ref·(N/n_ref)^batch_exponent (a power of two),
warm-up = warmup_tokens_ref·(N/n_ref)^warmup_exponent tokens (times ``moe_warmup_mult`` for MoE).

A config can be built before any data exists (``info=None``): the vocabulary size and the image
geometry then come from params (``vocab_source: params``); N, the schedule and the memory they
imply do not depend on the vocabulary when N excludes the embeddings (``model.count_embeddings:
false``, the default); with the paper's convention (``true``) N moves a little with it, as the
FLOPs per token always do. The learning rate comes from the law above (``lr_source: law``) or
from the size registry's per-size value (``lr_source: sizes``; the paper's Table 6).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from model.archs import variant
from model.config import ModelConfig, MoEConfig
from model.counting import Counts, count_params, flops_per_token
from model.sizes import size, size_config
from stages.params import Params, ParamsError

# ModelConfig fields that only some variants use: the others keep the defaults, so that a
# setting a variant never reads cannot change its config (or its id)
_UNUSED = ModelConfig()


@dataclass(frozen=True)
class Point:
    """One grid point's coordinates. ``experts``: the MoE expert count when the grid sweeps it
    (``grid.experts``); None means ``model.n_experts``."""

    arch: str  # a variant name (model/archs.py)
    size: str  # a size of model/sizes.py
    tokens: int  # D: decoder tokens to train on
    mixture: str  # a key of params.grid.mixtures
    seed: int
    experts: int | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["experts"] is None:
            del d["experts"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Point:
        return cls(**{k: d[k] for k in ("arch", "size", "tokens", "mixture", "seed")},
                   experts=d.get("experts"))  # fmt: skip

    @property
    def label(self) -> str:
        arch = self.arch if self.experts is None else f"{self.arch}-e{self.experts}"
        return f"{arch}-{self.size}-D{self.tokens}-{self.mixture}-s{self.seed}"


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


def schedule(
    tokens: int, n: int, params: Params, moe: bool, size_lr: float | None = None,
    arch: str | None = None,
) -> Schedule:  # fmt: skip
    """The schedule of a point of ``tokens`` tokens and ``n`` parameters (params ``train``);
    with ``train.lr_source: sizes`` the peak lr is ``size_lr``, the size's own; either way
    times ``train.lr_arch_mult`` of ``arch`` (1 for an arch it does not name)."""
    tp, context = params.train, params.data.context_length
    scale = n / tp.n_ref
    rows = 2 ** max(0, round(math.log2(max(1.0, tp.batch_rows_ref * scale**tp.batch_exponent))))
    batch_tokens = rows * context
    steps = max(2, round(tokens / batch_tokens))
    warmup_tokens = tp.warmup_tokens_ref * scale**tp.warmup_exponent
    warmup_tokens *= tp.moe_warmup_mult if moe else 1.0
    warmup = max(1, math.ceil(warmup_tokens / batch_tokens))
    cooldown = max(1, round(tp.cooldown_fraction * steps))
    if tp.lr_source == "sizes":
        if size_lr is None:
            raise ParamsError("train.lr_source is 'sizes' but this size has no lr of its own")
        lr = size_lr
    else:
        lr = tp.lr_ref * scale**tp.lr_exponent
    lr *= tp.lr_arch_mult.get(arch, 1.0) if arch is not None else 1.0
    return Schedule(rows, lr, warmup, steps, steps - cooldown, tp.schedule)


def data_shape(params: Params, info: dict[str, Any] | None) -> dict[str, Any]:
    """The vocabulary and image geometry a model is shaped by: the shards' ``info.json``, or
    before the data exists, params (the tokenizer's vocab_size is then an upper bound)."""
    if info is not None:
        keys = ("vocab_size", "image_size", "patch_size", "special_ids")
        return {**{k: info[k] for k in keys}, "vocab_source": "shards"}
    s = params.shards
    return {"vocab_size": params.tokenizer.vocab_size, "image_size": s.image_size,
            "patch_size": s.patch_size, "special_ids": {}, "vocab_source": "params"}  # fmt: skip


def image_share(
    info: dict[str, Any] | None, per_image: int, mixture: dict[str, float]
) -> float | None:
    """The expected share of image tokens among a batch's tokens under ``mixture``, from the
    training shards' totals (info.json); None before the data exists."""
    totals = (info or {}).get("totals")
    if not totals:
        return None
    share = 0.0
    for kind, p in mixture.items():
        t = totals.get(f"train/{kind}") or {}
        if p and t.get("tokens"):
            share += p * t.get("images", 0) * per_image / t["tokens"]
    return share


@dataclass(frozen=True)
class RunConfig:
    """The fully worked-out config of one grid point (see the module docstring).

    Fields above the line ``# --- how`` decide the point's numbers (:meth:`identity`); those
    below only how often it logs, evaluates and saves, and where it runs.
    """

    point: Point
    model: ModelConfig
    counts: Counts
    schedule: Schedule
    mixture: dict[str, float]  # sampling probability of each data kind
    context_length: int
    adam_beta2: float
    weight_decay: float
    grad_clip: float
    eval_batches: int  # validation batches per kind
    divergence_loss: float
    compile: bool
    device: str  # auto | cpu | cuda
    # --- how
    eval_every_steps: int
    log_every_steps: int
    checkpoint_every_steps: int
    checkpoint_format: str  # full | sharded (flows/training/checkpoints.py)
    checkpoint_store: str | None  # None: the grid's results folder
    checkpoint_async: bool
    branch_cooldowns: bool
    branch_steps: tuple[int, ...]  # cooldown starts of every budget of the point's group
    processes: int
    threads: int
    sharding: str  # none | fsdp
    micro_batch_rows: int  # rows per forward/backward pass on each process
    activation_checkpointing: bool
    attention: str  # sdpa | flex (model/decoder.py)
    loader_workers: int  # processes that read and decode shards ahead (0: the training process)
    loader_prefetch: int  # shards per kind read ahead by them
    vocab_source: str  # shards | params (planned before the data existed)
    image_share: float | None  # expected share of image tokens in a batch: the shards', or
    # before them params plan.image_share (None: unknown)
    HOW = ("eval_every_steps", "log_every_steps", "checkpoint_every_steps", "checkpoint_format",
           "checkpoint_store", "checkpoint_async", "branch_cooldowns",
           "branch_steps", "processes", "threads", "sharding", "micro_batch_rows",
           "activation_checkpointing", "attention", "loader_workers", "loader_prefetch",
           "vocab_source", "image_share")  # fmt: skip

    @classmethod
    def build(cls, params: Params, point: Point, info: dict[str, Any] | None) -> RunConfig:
        """The config of ``point`` (its expert count, if any, replaces ``model.n_experts``);
        ``info``: the shards' info.json, or None before the data exists."""
        v, mp, tp = variant(point.arch), params.model, params.train
        shape = data_shape(params, info)
        moe = MoEConfig(
            n_experts=point.experts or mp.n_experts,
            top_k=mp.top_k,
            aux_loss_weight=mp.aux_loss_weight,
            z_loss_weight=mp.z_loss_weight,
        )
        discrete, late = v.base == "discrete", v.base == "late"
        base = ModelConfig(
            vocab_size=shape["vocab_size"],
            context_length=params.data.context_length,
            image_size=shape["image_size"],
            patch_size=shape["patch_size"],
            codebook_size=params.codebook.n_codes if discrete else _UNUSED.codebook_size,
            special_ids=shape["special_ids"],
            enc_lr_mult=mp.enc_lr_mult if late else _UNUSED.enc_lr_mult,
        )
        model = size_config(point.size, v.config(base, moe))
        counts = count_params(model, with_embeddings=mp.count_embeddings)
        lr = size(point.size).lr
        sched = schedule(point.tokens, counts.N, params, v.moe, lr, point.arch)
        budgets = {
            schedule(t, counts.N, params, v.moe, lr, point.arch).cooldown_start
            for t in params.grid.tokens
        }
        share = sched.batch_rows // tp.processes  # rows each process trains per step
        batch_tokens = sched.batch_rows * params.data.context_length
        return cls(
            point=point,
            model=model,
            counts=counts,
            schedule=sched,
            mixture=params.grid.mixtures[point.mixture].as_dict(),
            context_length=params.data.context_length,
            adam_beta2=tp.adam_beta2,
            weight_decay=tp.weight_decay,
            grad_clip=tp.grad_clip,
            eval_batches=tp.eval_batches,
            divergence_loss=tp.divergence_loss,
            compile=tp.compile,
            device=tp.device,
            eval_every_steps=max(1, round(tp.eval_every_tokens / batch_tokens)),
            log_every_steps=tp.log_every_steps,
            checkpoint_every_steps=tp.checkpoint_every_steps,
            checkpoint_format=tp.checkpoint_format,
            checkpoint_store=tp.checkpoint_store,
            checkpoint_async=tp.checkpoint_async,
            branch_cooldowns=tp.branch_cooldowns,
            branch_steps=tuple(sorted(budgets | {sched.cooldown_start})),
            processes=tp.processes,
            threads=tp.threads,
            sharding=tp.sharding,
            micro_batch_rows=min(tp.micro_batch_rows or share, share) or 1,
            activation_checkpointing=tp.activation_checkpointing,
            attention=tp.attention,
            loader_workers=tp.loader_workers,
            loader_prefetch=tp.loader_prefetch,
            vocab_source=shape["vocab_source"],
            image_share=(
                image_share(info, model.image_tokens, params.grid.mixtures[point.mixture].as_dict())
                if info is not None
                else params.plan.image_share  # before the data: the share the study states
            ),
        )

    # ------------------------------------------------------------------ derived numbers

    @property
    def batch_tokens(self) -> int:
        return self.schedule.batch_rows * self.context_length

    @property
    def flops_per_token(self) -> float:
        """Training FLOPs per decoder token, 6N plus attention (model/counting.py)."""
        return flops_per_token(self.model, self.context_length)

    def compute(self, image_tokens: float | None = None) -> float:
        """Training compute C of the point's budget (paper Sec. 3.1: 6ND, or 6(N_v D_v + N D)
        for late fusion with D_v = ``image_tokens``, by default the budget's expected share)."""
        if image_tokens is None:
            image_tokens = (self.image_share or 0.0) * self.point.tokens
        return 6.0 * (self.counts.N_v * image_tokens + self.counts.N * self.point.tokens)

    def moe_fields(self) -> dict[str, Any]:
        """The runs-table fields of a MoE point's experts (none for a dense one): ``n_experts``,
        ``top_k`` and the sparsity S = 1 - top_k / n_experts (Abnar et al. 2025)."""
        m = self.model.moe
        if m is None:
            return {}
        return {"n_experts": m.n_experts, "top_k": m.top_k, "sparsity": 1.0 - m.top_k / m.n_experts}

    # ------------------------------------------------------------------ identity and JSON

    def identity(self) -> dict[str, Any]:
        """What decides the point's numbers (the plan adds the data and the code to it)."""
        d = self.to_dict()
        for k in self.HOW:
            del d[k]
        d["point"].pop("experts", None)  # it is model.moe.n_experts
        return d

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["point"] = self.point.to_dict()
        d["model"] = self.model.to_dict()
        d["counts"] = asdict(self.counts)
        d["schedule"] = asdict(self.schedule)
        d["branch_steps"] = list(self.branch_steps)
        d["mixture"] = dict(self.mixture)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        names = {f.name for f in fields(cls)}
        if set(d) != names:
            raise ValueError(
                f"not a run config: missing {sorted(names - set(d))}, unknown {sorted(set(d) - names)}"
            )
        return cls(**{
            **d,
            "point": Point.from_dict(d["point"]),
            "model": ModelConfig.from_dict(d["model"]),
            "counts": Counts(**d["counts"]),
            "schedule": Schedule(**d["schedule"]),
            "branch_steps": tuple(d["branch_steps"]),
        })  # fmt: skip

    @classmethod
    def from_json(cls, text: str) -> RunConfig:
        return cls.from_dict(json.loads(text))

    def with_(self, **kw: Any) -> RunConfig:
        return replace(self, **kw)

    def summary(self) -> dict[str, Any]:
        """One line of the plan: coordinates, counts, budget and schedule."""
        p, s = self.point, self.schedule
        return {
            "arch": p.arch,
            "size": p.size,
            **({"experts": p.experts} if p.experts is not None else {}),
            "tokens": p.tokens,
            "mixture": p.mixture,
            "seed": p.seed,
            "width": self.model.d_model,
            "depth": self.model.n_layers,
            "N": self.counts.N,
            "N_v": self.counts.N_v,
            "D": p.tokens,
            "C": self.compute(),
            "flops_per_token": self.flops_per_token,
            "batch_rows": s.batch_rows,
            "batch_tokens": self.batch_tokens,
            "steps": s.steps,
            "warmup_steps": s.warmup_steps,
            "cooldown_start": s.cooldown_start,
            "lr": s.lr,
            "processes": self.processes,
            "device": self.device,
            "vocab_source": self.vocab_source,
        }


def check_batch_split(configs: list[RunConfig]) -> None:
    """Before any compute: with ``train.processes`` P > 1 every point's global batch must split
    into P equal parts, one per rank (flows/training/dist.py), or the point would fail only
    once its processes had started. Raises ParamsError naming the sizes whose rows do not
    split, and the processes that would."""
    uneven = sorted({f"{c.point.arch} {c.point.size} ({c.schedule.batch_rows // c.processes} rows)"
                     for c in configs
                     if (c.schedule.batch_rows // c.processes) % c.micro_batch_rows})  # fmt: skip
    if uneven:
        raise ParamsError(
            f"train.micro_batch_rows={configs[0].micro_batch_rows} does not divide the rows "
            f"each process trains per step for {', '.join(uneven)}: use a power of two"
        )
    if not configs or configs[0].processes == 1:
        return
    procs = configs[0].processes
    rows = {}
    for c in configs:
        p = c.point
        rows[f"{p.arch} {p.size}" + (f" e{p.experts}" if p.experts else "")] = c.schedule.batch_rows
    bad = {k: v for k, v in rows.items() if v % procs}
    if bad:
        sizes = ", ".join(f"{k} ({v} rows)" for k, v in sorted(bad.items()))
        g = math.gcd(*rows.values())
        fits = [d for d in range(1, g + 1) if g % d == 0]
        raise ParamsError(
            f"train.processes={procs} does not divide the batch rows of {sizes}: each process "
            f"trains an equal share of every batch. Use train.processes in {fits}, or more "
            "rows (train.batch_rows_ref, train.batch_exponent)"
        )
