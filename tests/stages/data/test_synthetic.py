"""stages/data/synthetic.py: documents about the long-tail world, with exact floors.

The floors are checked by enumerating every outcome of a tiny world: for every sample, the
recorded ``nats`` is -log p(text | images) and ``nats_blind`` is -log p(text), computed here by
summing the probabilities of all outcomes with the same images and text (so the image's value,
their difference, is exact too)."""

from __future__ import annotations

import math
from collections import defaultdict
from functools import cache

import numpy as np
import pytest

from stages.data.shard_format import NAME, ROLES, VALUE
from stages.data.synthetic import (
    SAMPLERS,
    Chooser,
    enumerate_outcomes,
    make_doc,
    render,
    text_of,
)
from stages.data.world import BLOCK_GRID, COLORS, world
from stages.params import study_params

DEFAULT = study_params().corpus.synthetic
TINY = DEFAULT.model_copy(
    update=dict(
        entity_bits=2,
        zipf_a=1.3,
        classes=2,
        syllable_bits=1,
        attributes=2,
        values=2,
        max_entities=2,
        visual_bits=1,  # look-alikes: two entities share each look
        caption_facts=1,
        story_images=2,
        story_facts=1,
        text_facts=2,
        image_size=16,
    )
)


def _outcomes(kind: str, w):
    W = world(w, 0)

    @cache
    def pixels(scene):
        return render(scene, W, None).tobytes()

    for prob, segments, ch in enumerate_outcomes(lambda c: SAMPLERS[kind](c, W)):
        images = tuple(pixels(s) for s in segments if not isinstance(s, list))
        texts = tuple(text_of(s)[0] for s in segments if isinstance(s, list))
        yield prob, images, texts, ch


@pytest.mark.parametrize("kind", ["caption", "interleaved", "text"])
def test_recorded_nats_are_the_exact_surprisal_of_the_text_with_and_without_images(kind):
    outcomes = list(_outcomes(kind, TINY))
    joint: dict[tuple, float] = defaultdict(float)  # (images, texts) -> p
    p_images: dict[tuple, float] = defaultdict(float)
    p_texts: dict[tuple, float] = defaultdict(float)
    for prob, images, texts, _ in outcomes:
        joint[images, texts] += prob
        p_images[images] += prob
        p_texts[texts] += prob
    assert math.fsum(p for p, *_ in outcomes) == pytest.approx(1.0, abs=1e-12)
    assert len(p_images) >= (1 if kind == "text" else 10)
    floor = blind = 0.0
    for prob, images, texts, ch in outcomes:
        want = -math.log(joint[images, texts] / p_images[images])
        assert ch.nats == pytest.approx(want, abs=1e-9), (images, texts)
        assert ch.nats_blind == pytest.approx(-math.log(p_texts[texts]), abs=1e-9), texts
        floor += prob * ch.nats
        blind += prob * ch.nats_blind
    if kind == "text":
        assert floor == pytest.approx(blind)  # nothing to see
    else:
        assert blind - floor > 0.5  # the images are worth something: names, counts, changes


def test_a_non_injective_text_would_be_caught():
    """The check above can fail: two choices that write the same text break the accounting."""
    dist, recorded = defaultdict(float), 0.0
    for prob, text, ch in enumerate_outcomes(lambda c: c.pick(("a", "a", "b"), "text")):
        dist[text] += prob
        recorded += prob * ch.nats
    true = -sum(p * math.log(p) for p in dist.values())
    assert recorded == pytest.approx(math.log(3)) and true < recorded - 0.1


@pytest.mark.parametrize("kind", ["caption", "interleaved", "text"])
def test_samples_are_a_pure_function_of_seed_kind_and_index(kind):
    a = [make_doc(kind, i, DEFAULT, seed=3) for i in range(5)]
    b = [make_doc(kind, i, DEFAULT, seed=3) for i in reversed(range(5))][::-1]
    c = [make_doc(kind, i, DEFAULT, seed=4) for i in range(5)]
    assert a == b
    assert [d.texts for d in a] != [d.texts for d in c]
    assert all(d.meta["entropy_nats_blind"] >= d.meta["entropy_nats"] > 0 for d in a)


def test_word_tags_mark_names_and_values_of_their_entities():
    W = world(DEFAULT, 0)
    for i in range(20):
        doc = make_doc("caption", i, DEFAULT, 0)
        words, tags = doc.texts[1].split(" "), doc.meta["word_tags"][1]
        assert len(words) == len(tags)
        for j, (word, t) in enumerate(zip(words, tags, strict=True)):
            rank, role = divmod(t, len(ROLES))
            if role == NAME:
                assert word in W.name_words(rank)
            if role == VALUE:
                attribute = W.attributes.index(words[j - 1])
                assert word == W.values[W.value(rank, attribute)]  # the entity's fact


def test_the_image_shows_each_entitys_class_and_identity_bits_under_noise():
    """Decode a noisy rendering: each cell's colour gives the class, its blocks the bits."""
    W = world(DEFAULT, 0)
    ch = Chooser(np.random.default_rng(5))
    for trial in range(20):
        [scene, _] = SAMPLERS["caption"](ch, W)
        img = render(scene, W, np.random.default_rng(trial)).astype(float)
        cell = DEFAULT.image_size // 2
        margin, block = cell // 8, (cell - 2 * (cell // 8)) // BLOCK_GRID
        for c, r in scene:
            y0, x0 = (c // 2) * cell, (c % 2) * cell
            rim = img[y0, x0 : x0 + cell].mean(0)  # the top edge: the class colour
            colors = np.array([COLORS[k] for k in W.colors], dtype=float)
            assert int(np.argmin(((colors - rim) ** 2).sum(1))) == W.klass(r)
            bits = []
            for b in range(DEFAULT.visual_bits):
                by = y0 + margin + (b // BLOCK_GRID) * block
                bx = x0 + margin + (b % BLOCK_GRID) * block
                bits.append(int(img[by : by + block, bx : bx + block].mean() > 0.65 * rim.mean()))
            assert bits == W.look_bits(r)
