"""The size ladder: named sizes, and the config at a width or at a target N (one registry).

The paper fixes the depth (24) and grows the width (Table 6); late fusion's encoder is about
half the decoder's width. We keep that rule at laptop scale: depth fixed at ``LADDER_DEPTH``,
width in multiples of ``HEAD_DIM``, so N ~ 12·depth·d² grows smoothly (each named size is ~1.5x
wider, ~2.2x more N) and every size has the same shape. A fixed small depth (4, not 24) keeps
the smallest models from being all-depth-no-width, where a width ladder is no longer smooth.

``SIZES`` is the one list of size names: the params schema and every caller import it.
"""

from __future__ import annotations

from dataclasses import replace
from math import log
from typing import Any

from model.config import ModelConfig
from model.counting import count_params

LADDER_DEPTH = 4
HEAD_DIM = 16
SIZES = {"xxs": 32, "xs": 48, "s": 64, "m": 96, "l": 128, "xl": 192, "xxl": 256}  # name -> width


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
    widths = range(HEAD_DIM, 64 * HEAD_DIM + 1, HEAD_DIM)
    best = min(
        widths,
        key=lambda w: abs(log(count_params(config_for_width(w, base, **kw)).N) - log(size)),
    )
    return config_for_width(best, base, **kw)
