"""The synthetic world: determinism, and exact entropy accounting checked by enumeration."""

import math
from collections import defaultdict
from functools import cache

import numpy as np
import pytest

from stages.data.synthetic import (
    SAMPLERS,
    Chooser,
    enumerate_outcomes,
    make_doc,
    render,
)
from stages.params import SyntheticCorpus, study_params

WORLD = study_params().corpus.synthetic  # the repository's world
TINY = WORLD.model_copy(
    update=dict(
        image_size=8,
        grid=2,
        max_objects=2,
        shapes=["circle", "square"],
        colors=["red", "blue"],
        sizes=["large"],
        story_images=2,
        max_changes=1,
        jitter=0.0,
        noise=0.0,
    )
)


def _entropy(probs) -> float:
    total = sum(probs)
    return -sum(p / total * math.log(p / total) for p in probs if p > 0)


def _outcomes(kind: str, w: SyntheticCorpus):
    @cache
    def pixels(scene):
        return render(scene, w, None).tobytes()

    for prob, segments, ch in enumerate_outcomes(lambda c: SAMPLERS[kind](c, w)):
        images = tuple(pixels(s) for s in segments if not isinstance(s, str))
        texts = tuple(s for s in segments if isinstance(s, str))
        yield prob, images, texts, ch.nats


@pytest.mark.parametrize("kind", ["caption", "interleaved"])
def test_recorded_entropy_is_exact_conditional_entropy_given_the_images(kind):
    w = TINY if kind == "caption" else TINY.model_copy(update={"shapes": ["circle"]})
    by_image: dict[bytes, dict[tuple, float]] = defaultdict(lambda: defaultdict(float))
    recorded: dict[bytes, set[float]] = defaultdict(set)
    total = 0.0
    for prob, images, texts, nats in _outcomes(kind, w):
        by_image[images][texts] += prob
        recorded[images].add(round(nats, 9))
        total += prob
    assert math.isclose(total, 1.0, rel_tol=1e-9)
    assert len(by_image) > 10  # the enumeration covered many distinct images
    n_relations = 0
    for images, texts in by_image.items():
        h = _entropy(list(texts.values()))
        # every sample with these images records the same value, and it is H(text | images)
        assert len(recorded[images]) == 1
        assert recorded[images].pop() == pytest.approx(h, abs=1e-9)
        n_relations += any(" is " in t[0] for t in texts)
    assert n_relations > 0  # the relation sentence (a hidden choice of pair) was exercised


def test_text_documents_record_their_full_entropy_on_average():
    w = TINY.model_copy(update={"shapes": ["circle"]})
    dist: dict[tuple, float] = defaultdict(float)
    expected_nats = 0.0
    for prob, images, texts, nats in _outcomes("text", w):
        assert images == ()
        dist[texts] += prob
        expected_nats += prob * nats
    # the text is injective in the choices, so E[-log p(choices)] = H(text)
    assert expected_nats == pytest.approx(_entropy(list(dist.values())), abs=1e-9)


def test_a_non_injective_wording_would_be_caught():
    """The check above can fail: merge two openers' outputs and the accounting breaks."""

    def sampler(ch):
        words = ("a", "a", "b")  # two choices, one text: H(text) < log 3
        return ch.pick(words, hidden=True)

    dist, expected = defaultdict(float), 0.0
    for prob, text, ch in enumerate_outcomes(sampler):
        dist[text] += prob
        expected += prob * ch.nats
    assert expected == pytest.approx(math.log(3))
    assert _entropy(list(dist.values())) < expected - 0.1


def test_subset_is_uniform_over_all_k_subsets():
    seen = defaultdict(float)
    for prob, subset, _ in enumerate_outcomes(lambda c: c.subset(5, 2, hidden=True)):
        seen[subset] += prob
    assert len(seen) == math.comb(5, 2)
    assert all(s == tuple(sorted(s)) and len(set(s)) == 2 for s in seen)
    assert all(p == pytest.approx(1 / 10) for p in seen.values())


@pytest.mark.parametrize("kind", ["caption", "interleaved", "text"])
def test_samples_are_a_pure_function_of_seed_kind_and_index(kind):
    w = WORLD
    a = [make_doc(kind, i, w, seed=3) for i in range(5)]
    b = [make_doc(kind, i, w, seed=3) for i in reversed(range(5))][::-1]
    c = [make_doc(kind, i, w, seed=4) for i in range(5)]
    assert a == b
    assert [d.texts for d in a] != [d.texts for d in c]
    assert all(d.meta["entropy_nats"] > 0 for d in a)


def test_text_depends_on_the_image():
    """Captions state what is drawn: the colour words match the rendered pixels."""
    w = WORLD.model_copy(
        update={"jitter": 0.0, "noise": 0.0, "colors": ["red", "blue"], "max_objects": 1}
    )
    for i in range(20):
        ch = Chooser(np.random.default_rng(i))
        scene, caption = SAMPLERS["caption"](ch, w)
        img = render(scene, w, None).astype(int)
        red = (img[..., 0] > 150) & (img[..., 2] < 100)
        assert ("red" in caption) == bool(red.any())
