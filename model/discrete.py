"""The discrete visual tokenizer: a codebook of patch prototypes, learned by k-means.

The paper's discrete-token models (§2, App. A) turn each image patch into one id of a visual
vocabulary. Here the vocabulary is a :class:`VisualCodebook` of K codes in the normalised
patch space of model/patches.py (``3 p²`` values in [-1, 1], channel-last); the ``codebook``
stage (stages/codebook.py) learns it with k-means on training patches.

``encode`` returns code ids in ``0 .. K-1``. The discrete architecture embeds code ``k`` as
token ``vocab_size + k`` of the decoder's embedding table (``ModelConfig.total_vocab``);
adding that offset, and checking that ``K == ModelConfig.codebook_size`` and the patch sizes
agree, is the caller's job.
"""

from __future__ import annotations

import io
from pathlib import Path

import torch
from torch import nn

from model.patches import denormalise, normalise, patchify, unpatchify

MAX_DISTANCE_ELEMENTS = 1 << 20  # rows x codes per chunk of the distance matrix (4 MiB fp32)


@torch.no_grad()
def nearest_code(
    x: torch.Tensor, codes: torch.Tensor, max_elements: int = MAX_DISTANCE_ELEMENTS
) -> tuple[torch.Tensor, torch.Tensor]:
    """For rows ``x (N, D)``: the index of the nearest of ``codes (K, D)`` and its squared L2.

    Distances are ``||x||² - 2 x·c + ||c||²`` (one matmul), computed ``max_elements // K`` rows
    at a time; ties go to the lowest index. The distances from this expansion carry float32
    cancellation error (~1e-6 x ||x||²) and are clamped at 0; compute exact errors from
    ``x - codes[ids]`` when they matter. Always float32, also inside a bf16 autocast region:
    training must tokenize images exactly as the codebook stage measured them.
    """
    with torch.autocast(x.device.type, enabled=False):
        return _nearest_code(x.float(), codes.float(), max_elements)


def _nearest_code(
    x: torch.Tensor, codes: torch.Tensor, max_elements: int
) -> tuple[torch.Tensor, torch.Tensor]:
    N, K = x.shape[0], codes.shape[0]
    c2 = (codes * codes).sum(1)  # (K,)
    rows = max(1, max_elements // K)
    ids = torch.empty(N, dtype=torch.long, device=x.device)
    d2 = torch.empty(N, dtype=x.dtype, device=x.device)
    for s in range(0, N, rows):
        xs = x[s : s + rows]  # (n, D)
        d = torch.addmm(c2, xs, codes.T, alpha=-2.0)  # (n, K): ||c||² - 2 x·c
        best, idx = d.min(1)  # first index on ties
        ids[s : s + rows] = idx
        d2[s : s + rows] = (best + (xs * xs).sum(1)).clamp_min(0)
    return ids, d2


class VisualCodebook(nn.Module):
    """K codes ``(K, 3 p²)`` float32 in normalised patch space; encode images, decode ids."""

    codes: torch.Tensor

    def __init__(self, codes: torch.Tensor, patch_size: int):
        super().__init__()
        if codes.ndim != 2 or codes.shape[1] != 3 * patch_size * patch_size:
            raise ValueError(
                f"codes must be (K, 3·{patch_size}²) = (K, {3 * patch_size**2}), "
                f"got {tuple(codes.shape)}"
            )
        self.patch_size = patch_size
        self.register_buffer("codes", codes.detach().to(torch.float32).contiguous())

    @property
    def size(self) -> int:
        return self.codes.shape[0]

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``(M, 3, S, S)`` -> code ids ``(M, T)`` int64: the nearest code per patch."""
        x = normalise(patchify(images.to(self.codes.device), self.patch_size))  # (M, T, D)
        ids, _ = nearest_code(x.reshape(-1, x.shape[-1]), self.codes)
        return ids.reshape(x.shape[:2])

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """Code ids ``(M, T)`` -> their codes ``(M, T, 3 p²)``, normalised (the quantised patches)."""
        return self.codes[ids]

    @torch.no_grad()
    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """Code ids ``(M, T)`` -> uint8 images ``(M, 3, S, S)`` made of the codes' pixels.

        For looking at what the tokenizer keeps; rounding to uint8 adds up to half a grey level.
        """
        return unpatchify(denormalise(self.lookup(ids)), self.patch_size)

    def save(self, path: str | Path) -> None:
        """A torch zip loadable with ``torch.load(path, weights_only=True)``: ``{"codes":
        (K, 3p²) float32, "patch_size": int}``. The bytes depend only on the codes (not on
        the file name), so the same codes give a byte-identical file."""
        buf = io.BytesIO()
        torch.save({"codes": self.codes.detach().cpu(), "patch_size": self.patch_size}, buf)
        Path(path).write_bytes(buf.getvalue())

    @classmethod
    def from_file(
        cls, path: str | Path, map_location: str | torch.device = "cpu"
    ) -> VisualCodebook:
        state = torch.load(path, map_location=map_location, weights_only=True)
        if not isinstance(state, dict) or not {"codes", "patch_size"} <= state.keys():
            raise ValueError(f"{path} is not a codebook file (expected codes and patch_size)")
        return cls(state["codes"], int(state["patch_size"]))
