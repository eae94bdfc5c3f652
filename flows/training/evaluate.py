"""Evaluation of a point: validation losses on fixed held-out rows, and MoE routing.

:func:`evaluate` returns the validation loss per data kind and their average (paper §2.1), the
same rows with every image blanked, and on data with word tags (the synthetic world) the loss
per word role and per entity-rank decade; for MoE models also the routing table: per layer, the
share of the validation image and text tokens each expert received (paper Figs. 12-13).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from itertools import islice
from typing import Any

import torch

from flows.training.run import Run
from stages.data.kinds import KINDS
from stages.data.loader import val_batches
from stages.data.shard_format import NAME, ROLES, VALUE

EVAL_ROWS = 8  # rows per validation batch: the same held-out rows for every point


@dataclass
class Evaluation:
    metrics: dict[str, float]  # val_<kind>, val_avg, val_<kind>_noimage, val_<kind>_<role>, ...
    routing: dict[str, Any] | None  # MoE: per layer, each expert's share (None: dense)


@torch.no_grad()
def evaluate(run: Run) -> Evaluation:
    """Validation loss per kind on fixed held-out rows, and their average (paper §2.1).

    Also ``val_{kind}_noimage`` (the same rows with every image blanked: how much of the images
    the model uses) and, on data with word tags, the loss per word role ``val_{kind}_{role}``
    and per entity-rank decade of name and value tokens ``val_{role}_rank1e{b}`` (ranks in
    (10^(b-1), 10^b], all kinds together).
    """
    t0 = time.perf_counter()
    model, cfg = run.model, run.cfg
    model.eval()
    sums: dict[str, list[float]] = {}

    def add(key: str, losses: torch.Tensor) -> None:
        acc = sums.setdefault(key, [0.0, 0])
        acc[0] += float(losses.sum())
        acc[1] += losses.numel()

    def forward(batch):
        with torch.autocast("cuda", torch.bfloat16, enabled=run.device.type == "cuda"):
            return model(batch, per_token=True)

    moe = cfg.model.moe is not None
    routed = [{"image": 0.0, "text": 0.0} for _ in range(cfg.model.n_layers)]
    for kind in KINDS:
        for b in islice(val_batches(run.shards, kind, EVAL_ROWS, cfg.context_length),
                        cfg.eval_batches):  # fmt: skip
            b = b.to(run.device)
            o = forward(b)
            add(f"val_{kind}", o.token_loss)
            if len(b.images):
                blank = dataclasses.replace(b, images=torch.zeros_like(b.images))
                add(f"val_{kind}_noimage", forward(blank).token_loss)
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
            if moe:
                n_img = len(b.images) * cfg.model.image_tokens
                n_txt = b.tokens.numel() - n_img
                for acc, layer in zip(routed, o.moe, strict=True):
                    acc["image"] = acc["image"] + layer["image_frac"].float().cpu() * n_img
                    acc["text"] = acc["text"] + layer["text_frac"].float().cpu() * n_txt
    out = {k: s / c for k, (s, c) in sums.items() if c}
    per_kind = [out[f"val_{k}"] for k in KINDS if f"val_{k}" in out]
    if per_kind:
        out["val_avg"] = sum(per_kind) / len(per_kind)
    model.train()
    run.timing["eval"] += time.perf_counter() - t0
    return Evaluation(out, routing_table(routed) if moe else None)


def routing_table(routed: list[dict[str, Any]]) -> dict[str, Any]:
    """Per layer, the share of the image and of the text tokens each expert received."""
    layers = []
    for acc in routed:
        img, txt = (torch.as_tensor(acc[k], dtype=torch.float64) for k in ("image", "text"))
        layers.append(
            {
                "image": (img / img.sum().clamp(min=1e-12)).tolist(),
                "text": (txt / txt.sum().clamp(min=1e-12)).tolist(),
                "image_tokens": float(img.sum()),
                "text_tokens": float(txt.sum()),
            }
        )
    return {"layers": layers}
