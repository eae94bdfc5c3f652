"""The multimodal language model: one decoder, four ways for images to enter it (paper §2-4).

- ``early``: image patches -> one linear projection -> decoder width, placed at the image's
  token positions. No encoder.
- ``late``: a ViT encoder trained from scratch (width ~ half the decoder's) + MLP connector.
- ``discrete``: a learned visual codebook (stages/codebook.py) turns each patch into a code id;
  ids ``vocab_size + code`` are embedded by the decoder's (extended) embedding table.
- any of them with ``cfg.moe``: MoE FFNs in the decoder (learned or modality-aware routing).

The model consumes a :class:`stages.data.loader.Batch`-like object (``tokens``, ``targets``,
``loss_mask``, ``doc_ids``, ``positions``, ``images``, ``image_index``) but imports nothing from
stages/: model/ knows nothing of the pipeline around it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.config import ModelConfig
from model.decoder import Transformer, attention_mask, flex_mask, rope_cache
from model.patches import normalise, patchify


@dataclass
class Output:
    loss: torch.Tensor  # mean cross-entropy over text targets (nats/token)
    aux_loss: torch.Tensor  # weighted MoE auxiliary losses (0 for dense models)
    n_targets: torch.Tensor  # number of text targets in the batch
    moe: list[dict[str, torch.Tensor]] = field(default_factory=list)  # per MoE layer stats
    # with forward(per_token=True): each text target's cross-entropy, in loss_mask order
    token_loss: torch.Tensor | None = None

    @property
    def total(self) -> torch.Tensor:
        """What training minimises."""
        return self.loss + self.aux_loss


class VisionEncoder(nn.Module):
    """Late fusion's ViT: patch embedding + learned positions + bidirectional transformer +
    MLP connector to the decoder width (paper: CLIP architecture, trained from scratch)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.patch_embed = nn.Linear(cfg.patch_dim, cfg.enc_d_model)
        self.pos = nn.Parameter(torch.zeros(cfg.image_tokens, cfg.enc_d_model))
        self.encoder = Transformer(
            cfg.enc_d_model, cfg.enc_layers, cfg.enc_heads, cfg.enc_ffn_hidden, cfg.norm_eps
        )
        self.connector = nn.Sequential(
            nn.Linear(cfg.enc_d_model, cfg.d_model), nn.GELU(), nn.Linear(cfg.d_model, cfg.d_model)
        )

    def forward(self, patches: torch.Tensor) -> torch.Tensor:  # (M, T, 3pp) -> (M, T, d)
        h, _ = self.encoder(self.patch_embed(patches) + self.pos)
        return self.connector(h)


class MultimodalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, codebook: nn.Module | None = None):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.total_vocab, cfg.d_model)
        if cfg.arch == "early":
            self.patch_proj = nn.Linear(cfg.patch_dim, cfg.d_model)
        elif cfg.arch == "late":
            self.vision = VisionEncoder(cfg)
        elif cfg.arch == "discrete":
            if codebook is None:
                raise ValueError("arch 'discrete' needs a VisualCodebook (stages/codebook.py)")
            if codebook.codes.shape != (cfg.codebook_size, cfg.patch_dim):
                raise ValueError(
                    f"codebook has shape {tuple(codebook.codes.shape)}, config expects "
                    f"({cfg.codebook_size}, {cfg.patch_dim})"
                )
            self.codebook = codebook
        else:
            raise ValueError(f"arch must be early, late or discrete, got {cfg.arch!r}")
        self.decoder = Transformer(
            cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.ffn_hidden, cfg.norm_eps, cfg.moe
        )
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)  # text targets only
        # run the image path on rows without images too (on no patches: zero gradients), so that
        # every parameter takes part in every pass: sharded data parallelism (FSDP) needs every
        # process to run every module's collectives, whatever its rows hold
        self.every_parameter_every_pass = False
        self.attention, self.compiled_mask = "sdpa", False  # set_attention
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2: residual projections scaled by depth
            if name.endswith(("attn.wo.weight", "ffn.w2.weight", "ffn.w2")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layers))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear | nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        for name in ("w1", "w2", "w3"):  # MoE experts: stacked weights, same init as dense
            w = getattr(m, name, None)
            if isinstance(w, nn.Parameter):
                nn.init.normal_(w, std=0.02)

    def set_activation_checkpointing(self, on: bool) -> None:
        """Recompute each block's activations (decoder and ViT encoder) in the backward pass
        instead of keeping them: the same numbers, less memory, ~1/3 more compute."""
        for t in self.transformers():
            t.checkpointing = on

    def set_attention(self, kind: str, compiled: bool = False) -> None:
        """The decoder's attention: ``sdpa`` (a dense additive mask) or ``flex`` (FlexAttention
        with a block mask, built compiled when ``compiled``); the same numbers
        (model/decoder.py)."""
        if kind not in ("sdpa", "flex"):
            raise ValueError(f"attention must be sdpa or flex, not {kind!r}")
        self.attention, self.compiled_mask = kind, compiled

    def transformers(self) -> list[Transformer]:
        """The block stacks: the decoder, and late fusion's ViT encoder."""
        return [self.decoder] + ([self.vision.encoder] if self.cfg.arch == "late" else [])

    def parameter_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(decoder-side, vision-encoder) parameters: late fusion's encoder gets its own lr."""
        vision = list(self.vision.parameters()) if self.cfg.arch == "late" else []
        ids = {id(p) for p in vision}
        return [p for p in self.parameters() if id(p) not in ids], vision

    def embed(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Decoder inputs (B, L, d), is_image (B, L) bool and image_ids (B, L) (-1 for text)."""
        cfg, tokens = self.cfg, batch.tokens
        B, L = tokens.shape
        M, T = len(batch.images), cfg.image_tokens
        image_ids = torch.full((B, L), -1, dtype=torch.long, device=tokens.device)
        if M == 0 and not (self.every_parameter_every_pass and cfg.arch in ("early", "late")):
            return self.tok_emb(tokens), image_ids >= 0, image_ids
        rows = batch.image_index[:, 0:1].expand(M, T)
        cols = batch.image_index[:, 1:2] + torch.arange(T, device=tokens.device)
        image_ids = image_ids.index_put(
            (rows, cols), torch.arange(M, device=tokens.device)[:, None].expand(M, T)
        )
        if cfg.arch == "discrete":
            codes = self.codebook.encode(batch.images)  # (M, T)
            tokens = tokens.index_put((rows, cols), cfg.vocab_size + codes)
            return self.tok_emb(tokens), image_ids >= 0, image_ids
        if M == 0:  # (every_parameter_every_pass: the image path on no patches)
            patches = torch.zeros((0, T, cfg.patch_dim), device=tokens.device)
        else:
            patches = normalise(patchify(batch.images, cfg.patch_size))  # (M, T, 3pp)
        emb = self.patch_proj(patches) if cfg.arch == "early" else self.vision(patches)
        x = self.tok_emb(tokens).index_put((rows, cols), emb.to(self.tok_emb.weight.dtype))
        return x, image_ids >= 0, image_ids

    def hidden_states(self, batch: Any) -> tuple[torch.Tensor, list[dict]]:
        """Final decoder states (B, L, d) and the MoE layers' aux dicts."""
        x, is_image, image_ids = self.embed(batch)
        if self.attention == "flex":
            mask = flex_mask(batch.doc_ids, image_ids, self.compiled_mask)
        else:
            allowed = attention_mask(batch.doc_ids, image_ids)
            # additive form, built once: SDPA would convert a bool mask in every layer (~3%)
            mask = torch.zeros(allowed.shape, dtype=x.dtype, device=x.device)
            mask.masked_fill_(~allowed, float("-inf"))
        rope = rope_cache(
            batch.positions, self.cfg.d_model // self.cfg.n_heads, self.cfg.rope_theta
        )
        return self.decoder(x, rope, mask, is_image)

    def forward(self, batch: Any, per_token: bool = False) -> Output:
        h, aux = self.hidden_states(batch)
        m = batch.loss_mask.bool()
        logits = self.lm_head(h[m])  # only text-target positions: (n_targets, vocab)
        n = m.sum()
        aux_loss = sum((a["aux_loss"] for a in aux), torch.zeros((), device=h.device))
        if per_token:
            ce = F.cross_entropy(logits.float(), batch.targets[m], reduction="none")
            loss = ce.sum() / n.clamp(min=1)
            return Output(loss=loss, aux_loss=aux_loss, n_targets=n, moe=aux, token_loss=ce)
        loss = F.cross_entropy(logits.float(), batch.targets[m], reduction="sum") / n.clamp(min=1)
        return Output(loss=loss, aux_loss=aux_loss, n_targets=n, moe=aux)


def save_model(model: MultimodalLM, path: str | Path) -> None:
    """Config + weights, loadable with ``torch.load(weights_only=True)``."""
    torch.save({"config": model.cfg.to_dict(), "state_dict": model.state_dict()}, path)


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> MultimodalLM:
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    cfg = ModelConfig.from_dict(ckpt["config"])
    codebook = None
    if cfg.arch == "discrete":
        from model.discrete import VisualCodebook

        codes = ckpt["state_dict"]["codebook.codes"]
        codebook = VisualCodebook(codes, cfg.patch_size)
    model = MultimodalLM(cfg, codebook)
    model.load_state_dict(ckpt["state_dict"])
    return model
