"""The loader: mixture, packing, loss mask, images, determinism and resume."""

import json

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from stages.data.kinds import KINDS
from stages.data.loader import PackedLoader, val_batches
from stages.data.shard_format import read_shard, shard_paths
from stages.data.tokenizer import special_ids

MIX = {"caption": 0.45, "interleaved": 0.45, "text": 0.10}
B, L = 8, 64


def _loader(d, **kw):
    args = dict(batch_size=B, context_length=L, mixture=MIX, seed=0) | kw
    return PackedLoader(d.shards, **args)


def _special(d):
    return special_ids(Tokenizer.from_file(str(d.tokenizer)))


def _assert_equal(a, b):
    for name in vars(a):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_batch_shapes_and_dtypes(tiny_data):
    b = _loader(tiny_data).next_batch()
    assert b.tokens.shape == b.targets.shape == b.loss_mask.shape == b.doc_ids.shape == (B, L)
    assert b.tokens.dtype == torch.int64 and b.loss_mask.dtype == torch.float32
    S = tiny_data.params.shards.image_size
    assert b.images.dtype == torch.uint8 and b.images.shape[1:] == (3, S, S)
    assert b.image_index.shape == (len(b.images), 2) and b.kinds.shape == (B,)
    assert torch.equal(b.tokens[:, 1:], b.targets[:, :-1])


def test_mixture_proportions_over_many_batches(tiny_data):
    mix = {"caption": 0.2, "interleaved": 0.5, "text": 0.3}
    ld = _loader(tiny_data, mixture=mix, batch_size=16)
    counts = np.bincount(
        np.concatenate([ld.next_batch().kinds.numpy() for _ in range(150)]), minlength=3
    )
    n = counts.sum()
    for k, kind in enumerate(KINDS):  # binomial: within 4 standard deviations
        p = mix[kind]
        assert abs(counts[k] / n - p) < 4 * np.sqrt(p * (1 - p) / n), (kind, counts)
    only = _loader(tiny_data, mixture={"caption": 0, "interleaved": 0, "text": 1.0})
    assert set(only.next_batch().kinds.tolist()) == {KINDS.index("text")}


def test_loss_mask_is_one_exactly_on_text_targets_of_the_same_document(tiny_data):
    sp = _special(tiny_data)
    non_text = torch.tensor([sp[k] for k in ("pad", "bos", "image", "boi", "eoi")])
    ld = _loader(tiny_data)
    for _ in range(20):
        b = ld.next_batch()
        same_doc = torch.zeros_like(b.doc_ids, dtype=torch.bool)
        same_doc[:, :-1] = b.doc_ids[:, :-1] == b.doc_ids[:, 1:]
        # the last position's target is the next token of the same document unless it is pad
        same_doc[:, -1] = b.targets[:, -1] != sp["pad"]
        expected = same_doc & ~torch.isin(b.targets, non_text) & (b.doc_ids >= 0)
        assert torch.equal(b.loss_mask.bool(), expected)


def test_a_validation_pass_counts_every_text_target_exactly_once(tiny_data):
    """Across packed and continued rows, the mask sums to the shards' text-token count."""
    info = json.loads((tiny_data.shards / "info.json").read_text())
    for kind in KINDS:
        total = sum(int(b.loss_mask.sum()) for b in val_batches(tiny_data.shards, kind, B, L))
        assert total == info["totals"][f"val/{kind}"]["text_tokens"], kind


def test_a_batchs_rows_are_split_with_their_own_images(tiny_data):
    """One rank's share of a global batch (train.processes > 1): its rows, their images, the
    images' rows counted from the share's first row; the shares put together are the batch."""
    b = _loader(tiny_data).next_batch()
    parts = [b.rows(0, 3), b.rows(3, 8)]
    assert [p.tokens.shape[0] for p in parts] == [3, 5]
    for name in ("tokens", "targets", "loss_mask", "doc_ids", "positions", "kinds", "target_tags"):
        assert torch.equal(torch.cat([getattr(p, name) for p in parts]), getattr(b, name)), name
    assert torch.equal(torch.cat([p.images for p in parts]), b.images)
    shifted = torch.cat([parts[0].image_index, parts[1].image_index + torch.tensor([3, 0])])
    assert torch.equal(shifted, b.image_index) and len(b.images) > 0


def test_images_are_whole_and_in_place(tiny_data):
    sp, T = _special(tiny_data), tiny_data.params.shards.image_tokens
    stored = [
        im
        for p in shard_paths(tiny_data.shards, "val", "interleaved")
        for s in read_shard(p)
        for im in s.images
    ]
    seen = []
    for b in val_batches(tiny_data.shards, "interleaved", B, L):
        is_img = b.tokens == sp["image"]
        assert int(is_img.sum()) == T * len(b.images)  # no image is cut by a row boundary
        for (r, p), img in zip(b.image_index.tolist(), b.images, strict=True):
            assert b.tokens[r, p - 1] == sp["boi"] and bool(is_img[r, p : p + T].all())
            assert p + T < L and b.tokens[r, p + T] == sp["eoi"]
            assert b.loss_mask[r, p - 1 : p + T].sum() == 0  # no loss on image positions
            seen.append(img.permute(1, 2, 0).numpy())
    assert len(seen) == len(stored)
    assert all(np.array_equal(a, b) for a, b in zip(seen, stored, strict=True))


def test_documents_are_isolated_and_positions_restart(tiny_data):
    b = _loader(tiny_data).next_batch()
    for r in range(B):
        d, pos = b.doc_ids[r], b.positions[r]
        starts = torch.nonzero(d[1:] != d[:-1]).flatten() + 1
        assert all(pos[s] == 0 for s in starts.tolist()) and pos[0] == 0
        assert torch.all((pos[1:] == pos[:-1] + 1) | (d[1:] != d[:-1]))


def test_same_seed_same_batches_other_seed_other_batches(tiny_data):
    a, b, c = _loader(tiny_data), _loader(tiny_data), _loader(tiny_data, seed=1)
    for _ in range(5):
        x, y, z = a.next_batch(), b.next_batch(), c.next_batch()
        _assert_equal(x, y)
    assert not torch.equal(x.tokens, z.tokens)


@pytest.mark.parametrize("k", [1, 7, 40])  # 40 steps wraps the caption epoch
def test_resume_from_a_step_yields_the_same_next_batch(tiny_data, k):
    run = _loader(tiny_data)
    for _ in range(k):
        run.next_batch()
    state = run.state_dict()
    expected = run.next_batch()
    _assert_equal(_loader(tiny_data, start_step=k).next_batch(), expected)
    restored = _loader(tiny_data, seed=0)
    restored.load_state_dict(json.loads(json.dumps(state)))  # state survives JSON
    _assert_equal(restored.next_batch(), expected)


def test_a_kind_without_shards_is_refused(tiny_data, tmp_path):
    with pytest.raises(ValueError, match="no test shards"):
        _loader(tiny_data, split="test")


def test_reader_processes_ahead_give_the_same_batches_and_resume(tiny_data):
    """2 worker processes reading 2 shards ahead per kind: the batches of the in-process loader,
    over an epoch wrap, and a resumed one; the workers end with close()."""
    plain = _loader(tiny_data)
    ahead = _loader(tiny_data, workers=2, prefetch=2)
    try:
        for _ in range(45):  # wraps the caption epoch
            _assert_equal(ahead.next_batch(), plain.next_batch())
        state = ahead.state_dict()
        resumed = _loader(tiny_data, workers=1)
        try:
            resumed.load_state_dict(state)
            _assert_equal(resumed.next_batch(), plain.next_batch())
        finally:
            resumed.close()
        assert ahead.wait_s > 0 and plain.wait_s > 0
        procs = list(ahead.reader.pool._processes.values())
        assert len(procs) == 2 and all(p.is_alive() for p in procs)
    finally:
        ahead.close()
    assert not any(p.is_alive() for p in procs)
