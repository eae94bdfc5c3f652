"""Patches and the visual codebook: layout, scaling, nearest-code search, decode, save/load."""

import pytest
import torch

from model.discrete import VisualCodebook, nearest_code
from model.patches import denormalise, normalise, patchify, unpatchify

S, P = 16, 4  # T = 16 patches of 3·4² = 48 values


def _images(m: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (m, 3, S, S), generator=g, dtype=torch.uint8)


def test_patchify_shape_and_dtype():
    x = patchify(_images(5), P)
    assert x.shape == (5, (S // P) ** 2, 3 * P * P) and x.dtype == torch.float32


def test_patch_k_is_row_major_and_round_trips():
    n = S // P
    grid = torch.arange(n * n, dtype=torch.uint8).reshape(n, n)  # patch k has value k
    img = grid.repeat_interleave(P, 0).repeat_interleave(P, 1).expand(2, 3, S, S).contiguous()
    x = patchify(img, P)
    for k in range(n * n):
        assert (x[:, k] == k).all()
    assert torch.equal(unpatchify(x.to(torch.uint8), P), img)


def test_values_in_a_patch_are_channel_last():
    # pixel (c, i, j) of the top-left patch holds its flat index (i * P + j) * 3 + c
    img = torch.zeros(1, 3, S, S, dtype=torch.uint8)
    i, j, c = torch.meshgrid(torch.arange(P), torch.arange(P), torch.arange(3), indexing="ij")
    img[0, c, i, j] = ((i * P + j) * 3 + c).to(torch.uint8)
    assert torch.equal(patchify(img, P)[0, 0], torch.arange(3 * P * P, dtype=torch.float32))


def test_patchify_rejects_bad_sizes():
    with pytest.raises(ValueError, match="multiple"):
        patchify(_images(1), 5)


def test_normalise_is_global_scaling_to_minus_one_one():
    v = normalise(torch.tensor([0.0, 127.5, 255.0]))
    assert torch.allclose(v, torch.tensor([-1.0, 0.0, 1.0]))
    x = normalise(patchify(_images(4), P))
    assert x.min() >= -1 and x.max() <= 1
    flat = torch.full((1, 3, S, S), 200, dtype=torch.uint8)  # no per-patch centring
    assert torch.allclose(normalise(patchify(flat, P)), torch.tensor(200 / 127.5 - 1))
    u8 = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(denormalise(normalise(u8)), u8)


def _brute_force(x: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    return (x.double()[:, None] - codes.double()[None]).pow(2).sum(-1)  # (N, K)


def test_nearest_code_equals_brute_force_in_any_chunking():
    g = torch.Generator().manual_seed(1)
    x, codes = torch.rand(3000, 48, generator=g) * 2 - 1, torch.rand(64, 48, generator=g) * 2 - 1
    ids, d2 = nearest_code(x, codes)
    d = _brute_force(x, codes)
    assert torch.equal(ids, d.argmin(1))
    assert torch.allclose(d2.double(), d.min(1).values, atol=1e-4)
    small = nearest_code(x, codes, max_elements=64 * 700)  # 700 rows a chunk
    assert torch.equal(small[0], ids)  # (the matmul's last bits depend on the chunk shape)
    assert torch.allclose(small[1], d2, atol=1e-4)


def _codebook(k: int = 32, seed: int = 2) -> VisualCodebook:
    g = torch.Generator().manual_seed(seed)
    return VisualCodebook(torch.rand(k, 3 * P * P, generator=g) * 2 - 1, P)


def test_encode_is_the_nearest_code_of_each_normalised_patch():
    cb, imgs = _codebook(), _images(6)
    ids = cb.encode(imgs)
    assert ids.shape == (6, (S // P) ** 2) and ids.dtype == torch.int64
    x = normalise(patchify(imgs, P)).reshape(-1, 3 * P * P)
    d = _brute_force(x, cb.codes)
    chosen = d.gather(1, ids.reshape(-1, 1)).squeeze(1)
    assert torch.allclose(chosen, d.min(1).values, atol=1e-4)  # ties may pick either code
    assert (ids.reshape(-1) == d.argmin(1)).float().mean() > 0.999


def test_encode_ignores_autocast():
    cb, imgs = _codebook(), _images(64)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 distances would change ids
        inside = cb.encode(imgs)
    assert torch.equal(inside, cb.encode(imgs))


def test_decode_of_code_pixels_is_exact():
    cb = _codebook()
    cb.codes.copy_(normalise(denormalise(cb.codes)))  # codes that are uint8 pixels
    ids = torch.randint(0, cb.size, (3, (S // P) ** 2))
    imgs = cb.decode(ids)
    assert imgs.shape == (3, 3, S, S) and imgs.dtype == torch.uint8
    assert torch.equal(cb.encode(imgs), ids)
    assert torch.equal(cb.decode(cb.encode(imgs)), imgs)
    assert torch.equal(normalise(patchify(imgs, P)), cb.lookup(ids))


def test_save_load_round_trip(tmp_path):
    cb, imgs = _codebook(), _images(4)
    cb.save(tmp_path / "a.pt")
    cb.save(tmp_path / "other-name.pt")
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "other-name.pt").read_bytes()
    state = torch.load(tmp_path / "a.pt", weights_only=True)
    assert set(state) == {"codes", "patch_size"} and state["patch_size"] == P
    back = VisualCodebook.from_file(tmp_path / "a.pt")
    assert back.patch_size == P and torch.equal(back.codes, cb.codes)
    assert torch.equal(back.encode(imgs), cb.encode(imgs))
    assert "codes" in dict(back.named_buffers())  # moves with .to(device)


def test_codes_must_match_the_patch_size():
    with pytest.raises(ValueError, match="codes must be"):
        VisualCodebook(torch.zeros(8, 10), P)
