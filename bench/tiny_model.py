"""A minimal nanoGPT-style early-fusion decoder for the benchmarks (not the product's model/)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from stages.data.loader import Batch


class Block(nn.Module):
    def __init__(self, d: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.mlp(self.ln2(x))


class TinyEarlyFusion(nn.Module):
    """nanoGPT-style decoder with image patches projected in place of <image> tokens."""

    def __init__(
        self, vocab: int, patch: int, ctx: int, d: int = 32, n_layer: int = 5, n_head: int = 4
    ):
        super().__init__()
        self.patch = patch
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(ctx, d)
        self.patch_proj = nn.Linear(3 * patch * patch, d)
        self.blocks = nn.ModuleList(Block(d, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d)

    def forward(self, b: Batch) -> torch.Tensor:
        x = self.wte(b.tokens) + self.wpe(b.positions)
        if len(b.images):
            p = self.patch
            img = b.images.float() / 255.0  # (M, 3, S, S)
            patches = img.unfold(2, p, p).unfold(3, p, p)  # (M, 3, S/p, S/p, p, p)
            patches = patches.permute(0, 2, 3, 1, 4, 5).flatten(3).flatten(1, 2)  # (M, T, 3pp)
            emb = self.patch_proj(patches)
            T = emb.shape[1]
            rows = b.image_index[:, 0:1].expand(-1, T)
            cols = b.image_index[:, 1:2] + torch.arange(T)
            x = x.index_put((rows, cols), emb)
        for blk in self.blocks:
            x = blk(x)
        logits = self.ln_f(x) @ self.wte.weight.T
        loss = F.cross_entropy(logits.flatten(0, 1), b.targets.flatten(), reduction="none")
        return (loss * b.loss_mask.flatten()).sum() / b.loss_mask.sum().clamp(min=1)
