"""One typed config for every architecture.

``ModelConfig.arch`` chooses how images enter the one shared decoder (paper §2, App. A):
``early`` (patches projected straight in), ``late`` (a ViT encoder trained from scratch + MLP
connector), ``discrete`` (codebook ids appended to the vocabulary); ``moe`` swaps dense FFNs
for mixture-of-experts FFNs in any of them. The named variants a study trains are in
model/archs.py, the size ladder that fills widths and depths in model/sizes.py.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

Arch = Literal["early", "late", "discrete"]


def image_tokens(image_size: int, patch_size: int) -> int:
    """Decoder positions per image: one per patch, ``T = (S / p)²`` (model/patches.py; the
    one place it is computed: the shards, the schema and ``ModelConfig`` call this)."""
    if image_size % patch_size:
        raise ValueError(f"image size {image_size} is not a multiple of patch size {patch_size}")
    return (image_size // patch_size) ** 2


@dataclass(frozen=True)
class MoEConfig:
    """Token-choice top-k MoE (paper §4: 8 experts, top-1, load-balancing weight 0.01)."""

    n_experts: int = 8
    top_k: int = 1
    aux_loss_weight: float = 0.01  # load-balancing loss (Switch-style, minimal = 1 at uniform)
    z_loss_weight: float = 0.0  # router z-loss (ST-MoE); 0 disables
    modality_aware: bool = False  # hard-route image tokens to image experts, text to text
    image_experts: int | None = None  # experts reserved for images (default n_experts // 2)

    def __post_init__(self) -> None:
        if not 1 <= self.top_k <= self.n_experts:
            raise ValueError(f"top_k={self.top_k} must be in 1..n_experts={self.n_experts}")
        if self.modality_aware:
            n_img = self.n_image_experts
            if not (self.top_k <= n_img and self.top_k <= self.n_experts - n_img):
                raise ValueError(
                    f"modality_aware needs top_k <= image experts ({n_img}) and text experts "
                    f"({self.n_experts - n_img})"
                )

    @property
    def n_image_experts(self) -> int:
        return self.image_experts if self.image_experts is not None else self.n_experts // 2


@dataclass(frozen=True)
class ModelConfig:
    arch: Arch = "early"
    vocab_size: int = 1024  # text vocabulary (the tokenizer's); discrete adds codebook_size
    d_model: int = 64
    n_layers: int = 4
    n_heads: int = 4
    ffn_hidden: int = 176  # SwiGLU hidden size
    context_length: int = 256
    image_size: int = 32
    patch_size: int = 8
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    moe: MoEConfig | None = None
    # late fusion: the vision encoder (paper: CLIP-style ViT from scratch, width ~ half)
    enc_d_model: int = 32
    enc_layers: int = 2
    enc_heads: int = 2
    enc_ffn_hidden: int = 96
    enc_lr_mult: float = 0.1  # encoder lr = enc_lr_mult x decoder lr (paper Table 8)
    # discrete: codes of the visual tokenizer (stages/codebook.py)
    codebook_size: int = 256
    special_ids: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise ValueError(
                f"d_model={self.d_model} needs an even head dim with {self.n_heads} heads"
            )
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size={self.image_size} % patch_size={self.patch_size} != 0")

    @property
    def image_tokens(self) -> int:
        return image_tokens(self.image_size, self.patch_size)

    @property
    def patch_dim(self) -> int:
        return 3 * self.patch_size * self.patch_size

    @property
    def total_vocab(self) -> int:
        """Rows of the embedding table: text tokens, plus the codes for ``discrete``."""
        return self.vocab_size + (self.codebook_size if self.arch == "discrete" else 0)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        d = dict(d)
        if d.get("moe") is not None:
            d["moe"] = MoEConfig(**d["moe"])
        return cls(**d)

    def with_(self, **kw: Any) -> ModelConfig:
        return replace(self, **kw)
