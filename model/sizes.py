"""The size registry: every size a study may name, and the model config it gives (one place).

Three kinds of size, one shape rule (the paper's: a fixed depth, the width grows; late fusion's
ViT encoder is about half the decoder's width):

- **the laptop ladder** (``xxs`` .. ``xxl``): depth 4, head dim 16, widths 32 .. 256, each ~1.5x
  wider (~2.2x more N) than the one before. A small fixed depth keeps the smallest models from
  being all-depth-no-width, where a width ladder is no longer smooth.
- **the paper's Table 6** (``paper-275m`` .. ``paper-3b4``): depth 24, decoder widths
  800/1088/1632/2208/2624/3232 for early fusion and MoE (275M .. 3.35B parameters counted the
  paper's way: embeddings in, vocabulary 50432), each with the paper's peak learning rate. Late
  fusion's rows have their own widths: decoder 768 + encoder 384 (289.8M) up to decoder 3072 +
  encoder 1536 (3.7B) are the paper's; the four between (decoder 1024/1536/2048/2560, encoder
  half) are ours, as the paper gives only the ends. SwiGLU hidden = 8d/3 rounded up to a
  multiple of 256 (what reproduces the paper's counts). Head counts are ours (the paper gives
  none): the head dim is the multiple of 8 dividing the width that is closest to 64.
- **width x depth** (``w1024d24``): any width (a multiple of 16) and depth, shaped like the
  ladder below width 512 and like the paper's rows from 512 up; no learning rate of its own.

:data:`SIZES` maps each named size to its :class:`Size`; :func:`check_size` is what the params
schema calls (its error lists the allowed names and forms).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from math import log
from typing import Any

from model.config import ModelConfig
from model.counting import count_params

LADDER_DEPTH = 4
HEAD_DIM = 16  # the laptop ladder's head dim
PAPER_DEPTH = 24
WIDE = 512  # from this width on, the paper's shape rules (FFN rounding, head dim ~64)
_CUSTOM = re.compile(r"^w(\d+)d(\d+)$")


def _round(x: float, multiple: int) -> int:
    return max(multiple, int(round(x / multiple)) * multiple)


def ffn_hidden(width: int) -> int:
    """SwiGLU hidden size, 2/3 of 4d (Llama/DCLM): to the nearest multiple of 8 on the laptop
    ladder, rounded up to a multiple of 256 from width 512 (the paper's counts need that)."""
    if width < WIDE:
        return _round(8 * width / 3, 8)
    return math.ceil(8 * width / 3 / 256) * 256


def heads(width: int) -> int:
    """Attention heads: head dim 16 below width 512 (the ladder); from 512, the head dim is the
    multiple of 8 dividing the width that is closest to 64 (the larger on a tie), in 32..128
    (8..24 when none is)."""
    if width < WIDE:
        if width % HEAD_DIM:
            raise ValueError(f"width {width} must be a multiple of {HEAD_DIM}")
        return width // HEAD_DIM
    dims = [h for h in range(32, 129, 8) if width % h == 0]
    dims = dims or [h for h in range(8, 32, 8) if width % h == 0]  # e.g. 1616: 101 heads of 16
    if not dims:
        raise ValueError(f"width {width} has no head dim in 8..128 that is a multiple of 8")
    return width // min(dims, key=lambda h: (abs(h - 64), -h))


@dataclass(frozen=True)
class Shape:
    """A decoder (and, for late fusion, its encoder) at one size."""

    width: int
    depth: int
    enc_width: int
    enc_depth: int

    def fields(self) -> dict[str, Any]:
        """ModelConfig fields."""
        return dict(
            d_model=self.width,
            n_layers=self.depth,
            n_heads=heads(self.width),
            ffn_hidden=ffn_hidden(self.width),
            enc_d_model=self.enc_width,
            enc_layers=self.enc_depth,
            enc_heads=heads(self.enc_width),
            enc_ffn_hidden=ffn_hidden(self.enc_width),
        )


def _half(width: int) -> int:
    return _round(width / 2, HEAD_DIM)


def shape_at(width: int, depth: int) -> Shape:
    """A decoder of ``width`` x ``depth`` with an encoder of half its width, the same depth."""
    return Shape(width, depth, _half(width), depth)


@dataclass(frozen=True)
class Size:
    """A named size: its decoder (early fusion, discrete, MoE) and its late-fusion shape."""

    name: str
    shape: Shape
    late: Shape  # late fusion's decoder + encoder (the paper's rows have their own widths)
    lr: float | None = None  # the size's own peak learning rate (the paper's Table 6), if any
    source: str = "laptop ladder"

    def shape_for(self, arch: str) -> Shape:
        return self.late if arch == "late" else self.shape


def _ladder(name: str, width: int) -> Size:
    s = shape_at(width, LADDER_DEPTH)
    return Size(name, s, s)


def _paper(name: str, width: int, lr: float, late_width: int, late_enc: int, ours: bool) -> Size:
    late = Shape(late_width, PAPER_DEPTH, late_enc, PAPER_DEPTH)
    src = "paper Table 6" + (" (late fusion widths: ours)" if ours else "")
    # (early fusion has no encoder: its encoder fields are late fusion's, never used)
    return Size(name, Shape(width, PAPER_DEPTH, late_enc, PAPER_DEPTH), late, lr, src)


SIZES: dict[str, Size] = {
    s.name: s
    for s in (
        _ladder("xxs", 32),
        _ladder("xs", 48),
        _ladder("s", 64),
        _ladder("m", 96),
        _ladder("l", 128),
        _ladder("xl", 192),
        _ladder("xxl", 256),
        # the paper's Table 6: early/MoE width, its lr; late fusion's decoder and encoder widths
        _paper("paper-275m", 800, 1.5e-3, 768, 384, ours=False),
        _paper("paper-468m", 1088, 1.5e-3, 1024, 512, ours=True),
        _paper("paper-932m", 1632, 5e-4, 1536, 768, ours=True),
        _paper("paper-1b6", 2208, 4.2e-4, 2048, 1024, ours=True),
        _paper("paper-2b3", 2624, 4e-4, 2560, 1280, ours=True),
        _paper("paper-3b4", 3232, 3.5e-4, 3072, 1536, ours=False),
    )
}
LADDER = tuple(n for n, s in SIZES.items() if s.source == "laptop ladder")
PAPER = tuple(n for n in SIZES if n.startswith("paper-"))
ALLOWED = f"{', '.join(SIZES)}, or wWIDTHdDEPTH (e.g. w1024d24: width a multiple of 16)"


def size(name: str) -> Size:
    """The :class:`Size` a study names: a registered name or ``w<width>d<depth>``."""
    if name in SIZES:
        return SIZES[name]
    m = _CUSTOM.match(name) if isinstance(name, str) else None
    if m is None:
        raise ValueError(f"unknown size {name!r}; allowed: {ALLOWED}")
    width, depth = int(m[1]), int(m[2])
    if width % HEAD_DIM or width < HEAD_DIM or not 1 <= depth <= 256:
        raise ValueError(
            f"size {name!r}: width must be a positive multiple of {HEAD_DIM} and depth in 1..256"
        )
    s = shape_at(width, depth)
    heads(width), heads(s.enc_width)  # raises for a width with no usable head dim
    return Size(name, s, s, None, "width x depth")


def check_size(name: str) -> str:
    """``name`` if it names a size (the params schema's check), else ValueError naming them."""
    size(name)
    return name


def config_for_width(
    width: int, base: ModelConfig | None = None, depth: int = LADDER_DEPTH, **overrides: Any
) -> ModelConfig:
    """The config at decoder width ``width`` (multiple of HEAD_DIM) and ``depth``."""
    base = base or ModelConfig()
    if width % HEAD_DIM:
        raise ValueError(f"width {width} must be a multiple of {HEAD_DIM}")
    return replace(base, **(shape_at(width, depth).fields() | overrides))


def size_config(name: str | int | float, base: ModelConfig | None = None, **kw: Any) -> ModelConfig:
    """A config from a size (``"s"``, ``"paper-932m"``, ``"w1024d24"``; late fusion takes the
    size's late-fusion shape) or from a target N (``3e5``): the closest laptop-ladder width."""
    base = base or ModelConfig()
    if isinstance(name, str):
        return replace(base, **(size(name).shape_for(base.arch).fields() | kw))
    if name <= 0:
        raise ValueError(f"target N must be positive, got {name}")
    widths = range(HEAD_DIM, 64 * HEAD_DIM + 1, HEAD_DIM)
    best = min(
        widths,
        key=lambda w: abs(log(count_params(config_for_width(w, base, **kw)).N) - log(name)),
    )
    return config_for_width(best, base, **kw)
