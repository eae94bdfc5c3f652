"""stages/data/world.py: a large world from a seeded hash: distinct names and looks, Zipf
frequencies, exact posteriors, and a vocabulary the trained BPE keeps whole and small enough
for the smallest model's output layer."""

from __future__ import annotations

import math

import numpy as np
import pytest

from model.config import ModelConfig
from model.counting import step_flops
from model.sizes import LADDER, SIZES, size_config
from stages.data.synthetic import make_doc
from stages.data.tokenizer import train_bpe
from stages.data.world import Zipf, feistel, keyed, vocabulary, world
from stages.params import study_params

DEFAULT = study_params().corpus.synthetic  # the repository's world


@pytest.mark.parametrize("bits", [1, 7, 10, 13])
def test_the_keyed_permutation_is_a_bijection(bits):
    x = np.arange(1 << bits)
    perm = feistel(keyed(0, 9), x, bits)
    assert sorted(perm.tolist()) == x.tolist()
    assert (perm != x).mean() > 0.4 or bits == 1  # and it does move things


def test_every_entity_has_its_own_name_and_look_and_the_facts_use_every_value():
    W = world(DEFAULT, 0)
    names = {tuple(W.name_words(r)) for r in range(1, W.K + 1)}
    assert len(names) == W.K  # a hash collapse would show here (low bits of a weak hash)
    assert len(set(W._look.tolist())) == W.K  # visual_bits == entity_bits: no look-alikes
    classes = np.bincount(W._class, minlength=DEFAULT.classes) / W.K
    assert classes.min() > 0.9 / DEFAULT.classes  # classes are uniform over entities
    values = {W.value(r, f) for r in range(1, 2000) for f in range(DEFAULT.attributes)}
    assert values == set(range(DEFAULT.values))
    assert W.name_words(1)[0] == W.colors[W.klass(1)]  # a name starts with its class colour


def test_another_seed_is_another_world():
    a, b = world(DEFAULT, 0), world(DEFAULT, 1)
    assert [a.name_words(r) for r in range(1, 20)] != [b.name_words(r) for r in range(1, 20)]


def test_zipf_probabilities_and_samples():
    z = Zipf.of(1000, 1.5)
    p = np.exp(z.logp)
    assert p.sum() == pytest.approx(1.0) and p[0] / p[1] == pytest.approx(2**1.5)
    rng = np.random.default_rng(0)
    draws = np.searchsorted(z.cdf, rng.random(200_000), side="right")
    freq = np.bincount(draws, minlength=1000) / len(draws)
    assert freq[:5] == pytest.approx(p[:5], rel=0.02)
    assert z.entropy == pytest.approx(-(p * np.log(p)).sum())


def test_look_alikes_share_their_posterior_mass():
    """With fewer visible bits than identity bits, p(entity | look) sums to 1 over each look."""
    w = DEFAULT.model_copy(update={"entity_bits": 10, "visual_bits": 4})
    W = world(w, 0)
    post: dict[int, float] = {}
    for r in range(1, W.K + 1):
        post[W.look(r)] = post.get(W.look(r), 0.0) + math.exp(W.log_posterior(r))
    assert len(post) <= w.classes << w.visual_bits
    assert all(v == pytest.approx(1.0) for v in post.values())


@pytest.fixture(scope="module")
def tokenizer():
    texts = []
    for kind, n in (("caption", 1500), ("interleaved", 400), ("text", 600)):
        texts += [t for i in range(n) for t in make_doc(kind, i, DEFAULT, 0).texts if t]
    return train_bpe(iter(texts), 4096, 2)


def test_the_trained_bpe_keeps_every_word_whole(tokenizer):
    words = vocabulary(DEFAULT)
    split = [w for w in words if len(tokenizer.encode(w).ids) != 1]
    assert not split
    text = make_doc("caption", 7, DEFAULT, 0).texts[1]
    assert len(tokenizer.encode(text).ids) == len(text.split())  # a token per word


def test_the_vocabulary_is_small_enough_for_the_smallest_models_output_layer(tokenizer):
    """The BPE stops merging once every word is whole: the vocabulary is what the world needs,
    and the output layer costs the smallest ladder model a minority of its FLOPs."""
    V = tokenizer.get_vocab_size()
    assert V < 600  # 256 bytes + 6 specials + the words and their prefixes
    cfg = size_config(min(LADDER, key=lambda s: SIZES[s].shape.width), ModelConfig(vocab_size=V))
    rows, ctx = 4, 256
    targets = rows * ctx // 2  # about half the positions are text targets in the mixture
    head = 6 * targets * cfg.d_model * V
    assert head / step_flops(cfg, rows, ctx, targets, 0) < 0.3
