"""The long-tail world: 2^entity_bits entities defined by a seeded hash, nothing stored.

Power laws in both N and D come from a long tail of separately learnable items drawn with Zipf
frequencies (Michaud et al. 2023, arXiv 2303.13506; Hutter 2021, arXiv 2102.04074). Entity
``r`` (a rank, 1 = the most frequent) is mentioned with probability ``p(r) ∝ r^-a`` and has:

- a **coarse class**: one of ``classes`` colours, uniform over entities, so each class is
  frequent and learned early. The class is the background colour of the entity in an image and
  the first word of its name (``red``, ``blue``, ...);
- a **fine identity**: a pseudorandom ``entity_bits``-bit code (a keyed permutation of the
  rank), of which an image shows the first ``visual_bits`` as a grid of dark and light blocks.
  Entities of one class that share those bits look alike: the posterior over them is their
  Zipf mass (:meth:`World.log_posterior`), which the floor accounts for exactly;
- a **name**: the class word, then ``ceil(entity_bits / syllable_bits)`` syllables spelling
  another keyed permutation of the rank. Name and code are independent permutations, so
  mapping pixels to a name is a lookup to memorise per entity, not a rule to learn;
- **facts**: for each of ``attributes`` attributes, one of ``values`` values (a keyed hash).

Names, attributes and values are single words from small inventories (:func:`vocabulary`), each
kept whole by the trained byte-level BPE (tests/stages/data/test_world.py). The permutations are
4-round Feistel networks over splitmix64 rounds with cycle walking: bijective, and unlike a
multiplicative hash their low bits depend on every bit of the input (a ``(x ^ v) * prime``
hash once collapsed a probe's 2^20 entities to 64 distinct names).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from stages.params import SyntheticCorpus

MASK64 = (1 << 64) - 1
# class colours (RGB): the background of an entity's cell, and the first word of its name
COLORS = {
    "red": (220, 50, 50),
    "green": (50, 190, 70),
    "blue": (60, 100, 235),
    "yellow": (235, 215, 50),
    "magenta": (210, 60, 210),
    "cyan": (50, 210, 220),
    "orange": (245, 140, 30),
    "white": (235, 235, 235),
    "brown": (150, 95, 50),
    "pink": (245, 150, 185),
}
CONSONANTS, VOWELS = "bdfgklmnprstvz", "aeiou"
ATTRIBUTES = (
    "home", "food", "tool", "pet", "song", "game", "boat", "tree", "gem", "coin", "drink",
    "hat", "sport", "book", "star", "ship", "town", "lake", "bird", "fish", "job", "car",
    "dance", "flower", "color", "metal", "cloth", "fruit", "hill", "shop", "horse", "bell",
)  # fmt: skip
# the words of the templates that join names and facts into text
TEMPLATE_WORDS = ("we", "see", ",", "and", ".", "then", "arrives", "leaves", "has")
BLOCK_GRID = 4  # an image cell draws its identity bits as a 4 x 4 grid of blocks
MAX_VISUAL_BITS = BLOCK_GRID * BLOCK_GRID


def splitmix64(x: np.ndarray | int) -> np.ndarray:
    """The splitmix64 finaliser (Steele et al. 2014), vectorised over uint64."""
    with np.errstate(over="ignore"):  # arithmetic modulo 2^64 is the point
        z = np.asarray(x, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def keyed(seed: int, *parts: int) -> np.uint64:
    """A 64-bit key from the seed and small integers (a chain of splitmix64)."""
    k = splitmix64(np.uint64(seed & MASK64))
    for p in parts:
        k = splitmix64(k ^ np.uint64(p & MASK64))
    return k


def hash_values(key: np.uint64, x: np.ndarray) -> np.ndarray:
    """A pseudorandom uint64 per element of ``x`` (integers), for key ``key``."""
    return splitmix64(splitmix64(np.asarray(x, dtype=np.uint64) ^ key))


def feistel(key: np.uint64, x: np.ndarray, bits: int) -> np.ndarray:
    """A keyed bijection of ``[0, 2^bits)``: a balanced 4-round Feistel network on an even
    number of bits, with cycle walking back into range when ``bits`` is odd."""
    half = (bits + 1) // 2
    m = np.uint64((1 << half) - 1)
    x = np.asarray(x, dtype=np.uint64).copy()
    todo = np.ones(x.shape, dtype=bool)
    out = x.copy()
    while todo.any():
        v = out[todo]
        left, right = v >> np.uint64(half), v & m
        for r in range(4):
            f = hash_values(key ^ np.uint64(r + 1), right) & m
            left, right = right, left ^ f
        v = (left << np.uint64(half)) | right
        out[todo] = v
        todo = out >= np.uint64(1 << bits)  # cycle walking: apply again until in range
    return out


def syllables(n: int) -> list[str]:
    """``n`` consonant-vowel syllables (ba, be, ..., zu): the name alphabet."""
    out = [c + v for c in CONSONANTS for v in VOWELS]
    if n > len(out):
        raise ValueError(f"{n} syllables asked, {len(out)} available")
    return out[:n]


def value_words(n: int) -> list[str]:
    """``n`` consonant-vowel-consonant words (bab, bad, ...): the fact values."""
    out = [a + v + b for a in CONSONANTS for v in VOWELS for b in CONSONANTS]
    if n > len(out):
        raise ValueError(f"{n} values asked, {len(out)} available")
    # a fixed stride through the list: values differ in their first letters too
    step = 131  # coprime with 14 * 5 * 14 = 980
    return [out[(i * step) % len(out)] for i in range(n)]


@dataclass(frozen=True)
class Zipf:
    """P(rank r) ∝ r^-a over r = 1..K: the cumulative table to sample, the log-probabilities."""

    cdf: np.ndarray  # (K,) float64
    logp: np.ndarray  # (K,) float64

    @classmethod
    def of(cls, K: int, a: float) -> Zipf:
        logw = -a * np.log(np.arange(1, K + 1, dtype=np.float64))
        logz = np.logaddexp.reduce(logw)
        logp = logw - logz
        cdf = np.cumsum(np.exp(logp))
        cdf[-1] = 1.0
        return cls(cdf, logp)

    @property
    def entropy(self) -> float:
        return float(-(np.exp(self.logp) * self.logp).sum())


class World:
    """The entities of one (params, seed): names, classes, codes, facts, Zipf frequencies."""

    def __init__(self, w: SyntheticCorpus, seed: int):
        self.w, self.seed = w, seed
        self.K = 1 << w.entity_bits
        self.zipf = Zipf.of(self.K, w.zipf_a)
        self.colors = list(COLORS)[: w.classes]
        self.syllables = syllables(1 << w.syllable_bits)
        self.name_length = math.ceil(w.entity_bits / w.syllable_bits)
        self.attributes = list(ATTRIBUTES[: w.attributes])
        self.values = value_words(w.values)
        ranks = np.arange(1, self.K + 1)
        self._class = (hash_values(keyed(seed, 1), ranks) % np.uint64(w.classes)).astype(np.int64)
        self._code = feistel(keyed(seed, 2), ranks - 1, w.entity_bits).astype(np.int64)
        self._name = feistel(keyed(seed, 3), ranks - 1, w.entity_bits).astype(np.int64)
        # what an image shows of an entity: its class and the first visual_bits of its code
        self._look = self._class << w.visual_bits | self._code >> (w.entity_bits - w.visual_bits)
        mass = np.zeros((w.classes << w.visual_bits), dtype=np.float64)
        np.add.at(mass, self._look, np.exp(self.zipf.logp))
        self._look_logmass = np.log(mass, where=mass > 0, out=np.full_like(mass, -np.inf))

    @property
    def looks(self) -> np.ndarray:
        """The look of every entity, by rank - 1 (see :meth:`look`)."""
        return self._look

    def look_logmass(self, looks: np.ndarray) -> np.ndarray:
        """log of the Zipf mass of the entities that show each of ``looks``."""
        return self._look_logmass[looks]

    # ------------------------------------------------------------------ per entity
    def klass(self, r: int) -> int:
        return int(self._class[r - 1])

    def look(self, r: int) -> int:
        """What an image shows of entity ``r``: (class, visible code bits) as one integer."""
        return int(self._look[r - 1])

    def look_bits(self, r: int) -> list[int]:
        """The visible code bits of ``r``, most significant first (``visual_bits`` of them)."""
        vb = self.w.visual_bits
        code = int(self._code[r - 1]) >> (self.w.entity_bits - vb)
        return [(code >> (vb - 1 - i)) & 1 for i in range(vb)]

    def name_words(self, r: int) -> list[str]:
        """The class colour, then the syllables of the rank's name permutation."""
        x, sb = int(self._name[r - 1]), self.w.syllable_bits
        digits = [(x >> (sb * i)) & ((1 << sb) - 1) for i in reversed(range(self.name_length))]
        return [self.colors[self.klass(r)]] + [self.syllables[d] for d in digits]

    def value(self, r: int, attribute: int) -> int:
        h = hash_values(keyed(self.seed, 4, attribute), np.array([r]))[0]
        return int(h % np.uint64(self.w.values))

    def log_posterior(self, r: int) -> float:
        """log p(entity r | its look): what remains of its name after an image shows it."""
        return float(self.zipf.logp[r - 1] - self._look_logmass[self._look[r - 1]])


@functools.lru_cache(maxsize=4)
def world(w: SyntheticCorpus, seed: int) -> World:
    """The world of these params (cached: building it costs ~0.5 s for 2^20 entities)."""
    return World(w, seed)


def vocabulary(w: SyntheticCorpus) -> list[str]:
    """Every word the world writes (names, attributes, values, templates): the words the
    tokenizer must keep whole."""
    return (
        list(COLORS)[: w.classes]
        + syllables(1 << w.syllable_bits)
        + list(ATTRIBUTES[: w.attributes])
        + value_words(w.values)
        + list(TEMPLATE_WORDS)
    )
