"""Image patches: the one layout that early fusion, the ViT encoder and the codebook share.

An image ``(3, S, S)`` is cut into ``T = (S / p)²`` non-overlapping ``p × p`` patches (paper
§2: 224 px / 14 px -> 256 patches). Two orders are fixed here and nowhere else:

- **patch order**: row-major over the patch grid, top-left patch first, then left to right,
  then the next row down; patch ``k`` covers rows ``(k // n) p ... + p`` and columns
  ``(k % n) p ... + p`` with ``n = S / p``. This is also the order of the ``<image>``
  placeholders in a shard (stages/data/shard_format.py).
- **values inside a patch**: channel-last, i.e. the patch as a ``(p, p, 3)`` array flattened:
  index ``(i * p + j) * 3 + c`` holds pixel row ``i``, column ``j``, channel ``c``.

Pixel values are scaled globally to ``[-1, 1]`` by :func:`normalise`, with no per-patch mean or
std normalisation: in our data colour is information (a red circle is not a blue one).
"""

from __future__ import annotations

import torch


def patchify(images: torch.Tensor, p: int) -> torch.Tensor:
    """``(M, 3, S, S)`` images (any dtype, uint8 from the loader) -> ``(M, T, 3 p²)`` float32.

    Values are unchanged (0..255 for uint8 input); see the module docstring for the orders.
    """
    M, C, H, W = images.shape
    if C != 3 or H != W:
        raise ValueError(f"expected (M, 3, S, S) images, got {tuple(images.shape)}")
    if H % p:
        raise ValueError(f"image size {H} is not a multiple of patch size {p}")
    n = H // p
    x = images.reshape(M, 3, n, p, n, p)  # (M, c, row, i, col, j)
    x = x.permute(0, 2, 4, 3, 5, 1)  # (M, row, col, i, j, c)
    return x.reshape(M, n * n, p * p * 3).to(torch.float32)


def unpatchify(patches: torch.Tensor, p: int) -> torch.Tensor:
    """The inverse of :func:`patchify`: ``(M, T, 3 p²)`` -> ``(M, 3, S, S)``, same dtype."""
    M, T, dim = patches.shape
    n = round(T**0.5)
    if n * n != T or dim != 3 * p * p:
        raise ValueError(f"expected (M, n², 3·{p}²) patches, got {tuple(patches.shape)}")
    x = patches.reshape(M, n, n, p, p, 3)  # (M, row, col, i, j, c)
    x = x.permute(0, 5, 1, 3, 2, 4)  # (M, c, row, i, col, j)
    return x.reshape(M, 3, n * p, n * p)


def normalise(patches: torch.Tensor) -> torch.Tensor:
    """Pixel values 0..255 -> ``[-1, 1]``: ``(x / 255 - 0.5) / 0.5``, the same for every patch."""
    return (patches.to(torch.float32) / 255.0 - 0.5) / 0.5


def denormalise(x: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`normalise`, rounded and clipped to uint8 pixels."""
    return ((x * 0.5 + 0.5) * 255.0).round().clamp(0, 255).to(torch.uint8)
