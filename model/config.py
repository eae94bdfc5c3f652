"""One typed config for every architecture, and the size ladder that fills it from a name or N.

``ModelConfig.arch`` chooses how images enter the one shared decoder (paper §2, App. A):
``early`` (patches projected straight in), ``late`` (a ViT encoder trained from scratch + MLP
connector), ``discrete`` (codebook ids appended to the vocabulary); ``moe`` swaps dense FFNs
for mixture-of-experts FFNs in any of them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

Arch = Literal["early", "late", "discrete"]


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
        return (self.image_size // self.patch_size) ** 2

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


# --------------------------------------------------------------------------- size ladder
# The paper fixes the depth (24) and grows the width (Table 6); late fusion's encoder is about
# half the decoder's width. We keep that rule at laptop scale: depth fixed at LADDER_DEPTH,
# width in multiples of HEAD_DIM, so N ~ 12·depth·d² grows smoothly (each named size is ~1.5x
# wider, ~2.2x more N) and every size has the same shape. A fixed small depth (4, not 24) keeps
# the smallest models from being all-depth-no-width, where a width ladder is no longer smooth.
LADDER_DEPTH = 4
HEAD_DIM = 16
SIZES = {"xxs": 32, "xs": 48, "s": 64, "m": 96, "l": 128, "xl": 192, "xxl": 256}


def _round(x: float, multiple: int) -> int:
    return max(multiple, int(round(x / multiple)) * multiple)


def config_for_width(width: int, base: ModelConfig | None = None, **overrides: Any) -> ModelConfig:
    """The ladder's config at decoder width ``width`` (multiple of HEAD_DIM)."""
    base = base or ModelConfig()
    if width % HEAD_DIM:
        raise ValueError(f"width {width} must be a multiple of {HEAD_DIM}")
    enc = _round(width / 2, HEAD_DIM)
    fields_ = dict(
        d_model=width,
        n_layers=LADDER_DEPTH,
        n_heads=width // HEAD_DIM,
        ffn_hidden=_round(8 * width / 3, 8),  # SwiGLU: 2/3 of 4d, as in Llama/DCLM
        enc_d_model=enc,
        enc_layers=LADDER_DEPTH,
        enc_heads=enc // HEAD_DIM,
        enc_ffn_hidden=_round(8 * enc / 3, 8),
    )
    return replace(base, **(fields_ | overrides))


def size_config(size: str | int | float, base: ModelConfig | None = None, **kw: Any) -> ModelConfig:
    """A config from a size name (``"s"``) or a target N (``3e5``): the closest ladder width."""
    if isinstance(size, str):
        if size not in SIZES:
            raise ValueError(f"unknown size {size!r}; allowed: {', '.join(SIZES)} or a number (N)")
        return config_for_width(SIZES[size], base, **kw)
    if size <= 0:
        raise ValueError(f"target N must be positive, got {size}")
    from math import log

    from model.counting import count_params

    widths = range(HEAD_DIM, 64 * HEAD_DIM + 1, HEAD_DIM)
    best = min(
        widths,
        key=lambda w: abs(log(count_params(config_for_width(w, base, **kw)).N) - log(size)),
    )
    return config_for_width(best, base, **kw)
