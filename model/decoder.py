"""The one decoder every architecture shares (DCLM recipe, paper §2): pre-norm transformer with
RMSNorm, SwiGLU (or MoE) FFNs, QK-norm and rotary positions.

Attention is causal over text and bidirectional inside each image's tokens, and never crosses
a packed document boundary. Two ways to compute it, the same numbers (tests/model/test_flex.py:
outputs and gradients to 1e-5): PyTorch SDPA with a dense mask (:func:`attention_mask`, built
from the loader's ``doc_ids`` and the image positions; memory O(L²) per row, and no flash
kernel takes a mask), or FlexAttention with a block mask (:func:`flex_mask`: the same rule as a
function of positions; compiled, as ``train.compile`` does on GPU, it skips the masked blocks
and never materialises L×L; eager, as on CPU, it runs an unfused reference path).
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
from torch.utils.checkpoint import checkpoint

from model.config import MoEConfig
from model.layers import RMSNorm, SwiGLU


def attention_mask(doc_ids: torch.Tensor, image_ids: torch.Tensor) -> torch.Tensor:
    """(B, 1, L, L) bool, True where query i may attend to key j.

    ``doc_ids`` (B, L): the packed document of each position. ``image_ids`` (B, L): the image a
    position belongs to (its patch tokens), -1 elsewhere. Allowed: same document and (j <= i or
    i and j are tokens of the same image).
    """
    L = doc_ids.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool, device=doc_ids.device).tril()
    same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]
    same_img = (image_ids[:, :, None] == image_ids[:, None, :]) & (image_ids[:, :, None] >= 0)
    return (same_doc & (causal | same_img))[:, None]


def flex_mask(doc_ids: torch.Tensor, image_ids: torch.Tensor, compiled: bool) -> BlockMask:
    """:func:`attention_mask`'s rule as FlexAttention's block mask (B, 1, L, L): same document
    and (key at or before the query, or both tokens of the same image). ``compiled``: build it
    with torch.compile (on GPU: no L×L tensor at any point)."""
    B, L = doc_ids.shape

    def allowed(b, h, q, kv):
        same_img = (image_ids[b, q] == image_ids[b, kv]) & (image_ids[b, q] >= 0)
        return (doc_ids[b, q] == doc_ids[b, kv]) & ((kv <= q) | same_img)

    build = _compiled_create_block_mask() if compiled else create_block_mask
    return build(allowed, B, None, L, L, device=doc_ids.device)


@functools.cache
def _compiled_create_block_mask():
    return torch.compile(create_block_mask)


def rope_cache(positions: torch.Tensor, head_dim: int, theta: float) -> torch.Tensor:
    """Rotary phases e^{i·pos·θ_k} (Su et al. 2021), complex (B, 1, L, head_dim/2), for
    integer positions (B, L) that restart at 0 in each packed document."""
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device) / head_dim)
    ang = positions[:, None, :, None].float() * inv
    return torch.polar(torch.ones_like(ang), ang)


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x (B, H, L, hd) as complex numbers (Llama's form: one
    complex multiply, ~4x faster on CPU than the real-valued form)."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * freqs).flatten(-2).type_as(x)


class Attention(nn.Module):
    def __init__(self, dim: int, n_heads: int, eps: float = 1e-5):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, dim // n_heads
        self.wqkv = nn.Linear(dim, 3 * dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)
        self.q_norm = RMSNorm(self.head_dim, eps)  # QK-norm (Dehghani et al. 2023; DCLM)
        self.k_norm = RMSNorm(self.head_dim, eps)

    def forward(
        self,
        x: torch.Tensor,
        rope: torch.Tensor | None,
        mask: torch.Tensor | BlockMask | None,
    ) -> torch.Tensor:
        B, L, C = x.shape
        q, k, v = self.wqkv(x).view(B, L, 3, self.n_heads, self.head_dim).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, L, hd)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        if isinstance(mask, BlockMask):  # FlexAttention (flex_mask)
            y = flex_attention(q, k, v, block_mask=mask)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.wo(y.transpose(1, 2).reshape(B, L, C))


class Block(nn.Module):
    """x + attn(norm(x)), then + ffn(norm(x)); the FFN is dense SwiGLU or an MoE layer."""

    def __init__(self, dim: int, n_heads: int, ffn_hidden: int, eps: float, moe: MoEConfig | None):
        super().__init__()
        self.attn_norm, self.ffn_norm = RMSNorm(dim, eps), RMSNorm(dim, eps)
        self.attn = Attention(dim, n_heads, eps)
        if moe is None:
            self.ffn: nn.Module = SwiGLU(dim, ffn_hidden)
        else:
            from model.moe import MoEFFN

            self.ffn = MoEFFN(dim, ffn_hidden, moe)
        self.is_moe = moe is not None

    def forward(self, x, rope, mask, is_image=None) -> tuple[torch.Tensor, dict | None]:
        x = x + self.attn(self.attn_norm(x), rope, mask)
        if self.is_moe:
            y, aux = self.ffn(self.ffn_norm(x), is_image)
            return x + y, aux
        return x + self.ffn(self.ffn_norm(x)), None


class Transformer(nn.Module):
    """A stack of blocks with a final norm; used as the decoder and as the ViT encoder."""

    def __init__(
        self,
        dim: int,
        n_layers: int,
        n_heads: int,
        ffn_hidden: int,
        eps: float = 1e-5,
        moe: MoEConfig | None = None,
    ):
        super().__init__()
        self.blocks = nn.ModuleList(
            Block(dim, n_heads, ffn_hidden, eps, moe) for _ in range(n_layers)
        )
        self.norm = RMSNorm(dim, eps)
        # activation checkpointing: keep each block's input only, recompute the rest in backward
        self.checkpointing = False

    def forward(self, x, rope=None, mask=None, is_image=None) -> tuple[torch.Tensor, list[dict]]:
        aux = []
        recompute = self.checkpointing and torch.is_grad_enabled()
        for blk in self.blocks:
            if recompute:
                x, a = checkpoint(blk, x, rope, mask, is_image, use_reentrant=False)
            else:
                x, a = blk(x, rope, mask, is_image)
            if a is not None:
                aux.append(a)
        return self.norm(x), aux
