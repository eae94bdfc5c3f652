"""The codebook stage: real k-means, errors that agree with encode/decode, determinism, CLI."""

import json

import numpy as np
import pytest
import torch

from model.discrete import VisualCodebook
from model.patches import normalise, patchify
from stages.codebook import main
from stages.data.codebook import (
    CodebookError,
    build_codebook,
    reservoir_sample,
    update_codes,
)
from stages.data.shard_format import read_shard, shard_paths
from stages.params import CodebookParams, study_params
from tests.conftest import write_study

K, ITERS = 64, 15
ALL = 10**7  # more samples than the tiny shards hold: the sample is every train patch


def _params(**kw) -> CodebookParams:
    return study_params({"codebook": kw}).codebook


@pytest.fixture(scope="module")
def fitted(tiny_data):
    return build_codebook(tiny_data.shards, _params(n_codes=K, samples=ALL, iters=ITERS))


def _train_images(shards) -> torch.Tensor:
    imgs = [
        s.images
        for kind in ("caption", "interleaved")
        for path in shard_paths(shards, "train", kind)
        for s in read_shard(path)
        if len(s.images)
    ]
    return torch.from_numpy(np.concatenate(imgs)).permute(0, 3, 1, 2)  # (M, 3, S, S)


def test_kmeans_beats_random_codes_and_never_gets_worse(fitted):
    cb, r = fitted
    assert cb.size == K and r["n_codes"] == K and r["samples"] == r["patches_seen"]
    assert r["mse"] < 0.7 * r["baseline_mse"], r  # measured ~0.5
    h = r["mse_history"]
    assert len(h) == r["iterations"] + 1 and h[-1] < h[0]
    assert all(b <= a * (1 + 1e-5) for a, b in zip(h, h[1:], strict=False))  # Lloyd is monotone
    assert 1 < r["perplexity"] <= K and r["codes_used"] <= K
    assert r["mse"] == pytest.approx(h[-1], rel=1e-4)


def test_reported_error_is_the_encode_decode_error_on_those_patches(fitted, tiny_data):
    cb, r = fitted
    imgs = _train_images(tiny_data.shards)
    assert len(imgs) * (r["image_size"] // r["patch_size"]) ** 2 == r["patches_seen"]
    ids = cb.encode(imgs)
    x = normalise(patchify(imgs, cb.patch_size))
    assert ((x - cb.lookup(ids)) ** 2).double().mean().item() == pytest.approx(r["mse"], rel=1e-5)
    # decode rounds codes to uint8 pixels: at most half a grey level (1/255 normalised) each
    y = normalise(patchify(cb.decode(ids), cb.patch_size))
    assert ((x - y) ** 2).double().mean().item() == pytest.approx(r["mse"], rel=2e-3)
    assert (y - cb.lookup(ids)).abs().max() <= 1 / 255 + 1e-6


def test_too_large_k_names_codebook_size(tiny_data):
    with pytest.raises(CodebookError, match=r"codebook\.n_codes=65536"):
        build_codebook(tiny_data.shards, _params(n_codes=65536, samples=ALL, iters=1))


def test_reservoir_is_every_row_when_it_fits_and_a_uniform_sample_otherwise():
    rows = np.arange(10_000)[:, None]
    chunks = lambda: (rows[s : s + 37] for s in range(0, len(rows), 37))  # noqa: E731
    everything, seen = reservoir_sample(chunks(), 20_000, np.random.default_rng(0))
    assert seen == 10_000 and np.array_equal(everything, rows)
    a, _ = reservoir_sample(chunks(), 1000, np.random.default_rng(0))
    b, _ = reservoir_sample(chunks(), 1000, np.random.default_rng(0))
    assert np.array_equal(a, b) and len(np.unique(a)) == 1000  # deterministic, no repeats
    # uniform over the stream: each tenth holds ~100 of the 1000 (binomial sd ~9.5)
    assert np.all(np.abs(np.bincount(a[:, 0] // 1000, minlength=10) - 100) < 45)


def test_empty_cluster_is_reseeded_at_the_farthest_patch():
    x = torch.tensor([[0.0], [0.1], [5.0], [1.0]])
    ids = torch.tensor([0, 0, 0, 1])  # code 2 has no patches
    d2 = torch.tensor([0.1, 0.0, 20.0, 0.0])
    codes, n_empty = update_codes(x, ids, d2, 3)
    assert n_empty == 1 and codes[2].item() == 5.0
    assert codes[0].item() == pytest.approx(5.1 / 3) and codes[1].item() == 1.0


def test_stage_cli_end_to_end_and_byte_identical(tiny_data, tmp_path):
    params = tmp_path / "params.yaml"
    write_study(params, {"codebook": {"n_codes": K, "samples": 3000, "iters": 5}})
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        args = ["--params", str(params), "--shards", str(tiny_data.shards), "--out", str(out)]
        assert main(args) == 0
    for name in ("codebook.pt", "report.json"):  # so a rerun leaves the grid stage up to date
        a, b = ((o / name).read_bytes() for o in outs)
        assert a == b, name
    report = json.loads((outs[0] / "report.json").read_text())
    assert report["samples"] == 3000 < report["patches_seen"] and report["n_codes"] == K
    cb = VisualCodebook.from_file(outs[0] / "codebook.pt")
    assert cb.codes.shape == (K, report["patch_dim"]) and cb.patch_size == report["patch_size"]
    assert torch.load(outs[0] / "codebook.pt", weights_only=True)["codes"].dtype == torch.float32

    write_study(params, {"codebook": {"n_codes": 65536, "samples": 3000}})
    assert main(["--params", str(params), "--shards", str(tiny_data.shards), "--out", "x"]) == 1


def test_max_shards_draws_the_sample_from_a_seeded_subset_of_the_train_shards(tiny_data):
    """codebook.max_shards: 1 reads one train shard (fewer patches seen, the same on a rerun);
    a bound above the shard count reads them all, as null does."""
    from stages.data.codebook import train_patches

    paths = [p for kind in ("caption", "interleaved") for p in shard_paths(tiny_data.shards, "train", kind)]  # fmt: skip
    assert len(paths) >= 2
    per_shard = [len(x) for x in train_patches(tiny_data.shards, 32, 8)]
    one = [len(x) for x in train_patches(tiny_data.shards, 32, 8, max_shards=1, seed=3)]
    assert len(one) == 1 and one[0] in per_shard
    assert one == [len(x) for x in train_patches(tiny_data.shards, 32, 8, max_shards=1, seed=3)]
    every = [len(x) for x in train_patches(tiny_data.shards, 32, 8, max_shards=len(paths))]
    assert every == per_shard
    _, report = build_codebook(tiny_data.shards, _params(n_codes=8, samples=ALL, iters=2,
                                                          max_shards=1))  # fmt: skip
    seed3 = [len(x) for x in train_patches(tiny_data.shards, 32, 8, max_shards=1, seed=0)]
    assert report["patches_seen"] == seed3[0] < sum(per_shard)


def test_look_information_is_zero_when_every_patch_is_a_code_and_all_when_one_code_is():
    """The codes' information loss on the world's looks: a codebook holding every distinct
    noise-free patch keeps every look apart (0 bits lost), one code loses everything, and a small
    k-means codebook loses a part."""
    from stages.data.codebook import look_information
    from stages.data.synthetic import render
    from stages.data.world import world

    w = study_params({"corpus": {"synthetic": {"entity_bits": 10, "visual_bits": 10,
                                               "classes": 4}}}).corpus.synthetic  # fmt: skip
    W = world(w, 0)
    looks, first = np.unique(W.looks, return_index=True)
    imgs = np.stack([render(((0, int(r) + 1),), W, None) for r in first])
    patches = patchify(torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous(), 8)
    patches = patches.reshape(-1, patches.shape[-1])
    every = VisualCodebook(normalise(torch.unique(patches, dim=0)), 8)
    kept = look_information(every, w, 0)
    assert kept["looks"] == len(looks) and kept["code_tuples"] == len(looks)
    assert kept["bits_lost"] == pytest.approx(0, abs=1e-9) and kept["mass_shared"] == 0
    assert 0 < kept["bits_per_look"] <= np.log2(len(looks))
    # the world's pixel noise moves some cells off their clean codes: measured, in range
    assert 0 <= kept["noise"]["mass_changed"] <= 1 and kept["noise"]["bits_lost"] >= 0
    assert "noise" not in look_information(every, w.model_copy(update={"noise": 0.0}), 0)
    one = look_information(VisualCodebook(every.codes[:1], 8), w, 0)
    assert one["code_tuples"] == 1 and one["mass_shared"] == pytest.approx(1)
    assert one["bits_lost"] == pytest.approx(one["bits_per_look"]) and one[
        "share_lost"
    ] == pytest.approx(1)
    few = look_information(VisualCodebook(every.codes[:: max(1, len(every.codes) // 6)], 8), w, 0)
    assert 0 < few["share_lost"] < 1 and 1 < few["code_tuples"] < len(looks)


def _reference_render(scene, W, rng) -> np.ndarray:
    """The drawing as first written, block by block: the bytes render must keep (the corpus's
    images, and so every shard and point id, depend on them)."""
    from stages.data.synthetic import BACKGROUND
    from stages.data.world import BLOCK_GRID, COLORS

    S = W.w.image_size
    cell, img = S // 2, np.full((S, S, 3), BACKGROUND, dtype=np.float32)
    margin = cell // 8
    block = (cell - 2 * margin) // BLOCK_GRID
    for c, r in scene:
        y0, x0 = (c // 2) * cell, (c % 2) * cell
        color = np.array(COLORS[W.colors[W.klass(r)]], dtype=np.float32)
        img[y0 : y0 + cell, x0 : x0 + cell] = color
        bits = W.look_bits(r)
        for b in range(BLOCK_GRID * BLOCK_GRID):
            shade = (0.3, 1.0)[bits[b]] if b < len(bits) else 0.65
            by, bx = y0 + margin + (b // BLOCK_GRID) * block, x0 + margin + (b % BLOCK_GRID) * block
            img[by : by + block, bx : bx + block] = color * shade
    if rng is not None and W.w.noise > 0:
        img += rng.normal(0.0, W.w.noise, img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("visual_bits", [16, 5])
def test_the_look_census_draws_the_images_render_draws(visual_bits):
    """render_many (the census's batched drawing) and render (the corpus's, one scene) give the
    block-by-block drawing's bytes scene by scene, with the world's pixel noise drawn in the same
    order, for full scenes and scenes with empty cells, and with fewer visible bits than blocks
    (the neutral shade)."""
    from stages.data.synthetic import render, render_many
    from stages.data.world import world

    w = study_params({"corpus": {"synthetic": {"visual_bits": visual_bits}}}).corpus.synthetic
    W = world(w, 3)
    _, first = np.unique(W.looks, return_index=True)
    ranks = [int(r) + 1 for r in first[:40]]
    scenes = [tuple(enumerate(ranks[i : i + 4])) for i in range(0, 40, 4)]
    scenes += [((1, ranks[0]), (3, ranks[5])), ()]
    assert w.noise > 0
    for seed in (None, 11):
        rng = [None if seed is None else np.random.default_rng(seed) for _ in range(3)]
        want = np.stack([_reference_render(s, W, rng[0]) for s in scenes])
        got = render_many(scenes, W, rng[1])
        assert got.dtype == np.uint8 and np.array_equal(got, want), seed
        one = np.stack([render(s, W, rng[2]) for s in scenes])
        assert np.array_equal(one, want), seed
