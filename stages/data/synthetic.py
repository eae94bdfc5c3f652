"""The embedded default data: documents about the long-tail world, with exactly known floors.

Three kinds of samples, as in the paper's mixture, about the entities of stages/data/world.py:

- **caption**: an image of 1..``max_entities`` entities in a 2 x 2 grid of cells, then
  ``we see A , B and C .`` (the entities in reading order of their cells, so the image decides
  the order) and ``caption_facts`` facts ``A has home bak .`` about entities of the image;
- **interleaved**: ``story_images`` images; the first shows a few entities, each next one the
  same cells with one entity arrived or left. The text after the first image lists them, the text
  after each next image says ``then B arrives .`` or ``then A leaves .``; every text segment
  ends with ``story_facts`` facts about entities present;
- **text**: ``text_facts`` facts about entities drawn from the Zipf law: name -> fact, with no
  image.

Names and values are only predictable from the pixels (image -> name) and from memory (name ->
fact): part of every caption and interleaved text needs the image.

**Exact floors.** Every random choice goes through a :class:`Chooser`, which adds its surprisal
``-log p`` to ``nats`` (the information the text carries beyond the images) and to
``nats_blind`` (beyond nothing) according to what it reveals: ``"text"`` (only the text shows
it: both), ``"image"`` (an image shows it and the text repeats it: blind only) or ``"none"``
(the text does not depend on it: neither). An entity in an image is shown up to its look
(class and visible code bits), so its name costs ``-log p(entity | look)`` with the image and
``-log p(entity)`` without. The text is an injective function of the counted choices given
the images (facts pick among the *distinct* entities named so far), so per sample ``nats`` is
exactly ``-log p(text | images)`` and ``nats_blind`` is ``-log p(text)``; averaged over samples,
the floors of the text loss with and without the images (tests/stages/data/test_synthetic.py
checks both by enumerating every outcome of a tiny world). Their difference is what the images
are worth. Each text also carries word tags (role and entity rank) so that losses can be split
by role (name, attribute, value, template) and by how frequent the entity is.
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Literal, TypeVar

import numpy as np
from PIL import Image

from stages.data.corpus_format import Doc
from stages.data.shard_format import ATTRIBUTE, NAME, TEMPLATE, VALUE, tag
from stages.data.world import BLOCK_GRID, COLORS, World, world
from stages.params import SyntheticCorpus

T = TypeVar("T")
Info = Literal["text", "image", "none"]
KIND_IDS = {"caption": 0, "interleaved": 1, "text": 2}
SLOTS = 4  # an image is a 2 x 2 grid of cells


# --------------------------------------------------------------------------- random choices


class Chooser:
    """Makes random choices and adds each one's surprisal to the floors it counts in."""

    def __init__(self, rng: np.random.Generator | None = None):
        self.rng = rng
        self.nats = 0.0  # -log p(text | images)
        self.nats_blind = 0.0  # -log p(text)
        self.trace: list[tuple[int, int, float]] = []  # (options, chosen, its probability)

    def _draw(self, k: int, cdf: np.ndarray | None) -> int:
        if cdf is None:
            return int(self.rng.integers(k))
        return int(np.searchsorted(cdf, self.rng.random(), side="right"))

    def note(self, nats: float, blind: float) -> None:
        """Surprisal a choice's outcome adds to the text, with and without the images."""
        self.nats += nats
        self.nats_blind += blind

    def index(self, k: int, info: Info) -> int:
        """A uniform choice among ``k``; ``info``: what reveals it (see the module docstring)."""
        assert k >= 1, k
        i = self._draw(k, None) if k > 1 else 0
        self.trace.append((k, i, 1.0 / k))
        lg = math.log(k)
        self.note(lg if info == "text" else 0.0, lg if info in ("text", "image") else 0.0)
        return i

    def pick(self, options: Sequence[T], info: Info) -> T:
        return options[self.index(len(options), info)]

    def subset(self, n: int, k: int, info: Info) -> tuple[int, ...]:
        """A uniform k-subset of range(n), sorted, as ONE choice among C(n, k) (unranked)."""
        rank = self.index(math.comb(n, k), info)
        out, x = [], 0
        for remaining in range(k, 0, -1):  # combinatorial unranking, lexicographic order
            while math.comb(n - x - 1, remaining - 1) <= rank:
                rank -= math.comb(n - x - 1, remaining - 1)
                x += 1
            out.append(x)
            x += 1
        return tuple(out)

    def entity(self, W: World, in_image: bool) -> int:
        """A Zipf-drawn entity rank. In an image its look is shown: its name then costs only
        ``-log p(r | look)``; elsewhere (and without the images) ``-log p(r)``."""
        i = self._draw(W.K, W.zipf.cdf)
        r = i + 1
        logp = float(W.zipf.logp[i])
        self.trace.append((W.K, i, math.exp(logp)))
        self.note(-W.log_posterior(r) if in_image else -logp, -logp)
        return r


class ScriptChooser(Chooser):
    """Follows a fixed script of choices, then takes option 0 (for exhaustive enumeration)."""

    def __init__(self, script: Sequence[int]):
        super().__init__(None)
        self.script = list(script)

    def _draw(self, k: int, cdf: np.ndarray | None) -> int:
        j = len(self.trace)
        return self.script[j] if j < len(self.script) else 0


def enumerate_outcomes(fn: Callable[[Chooser], T]) -> Iterator[tuple[float, T, Chooser]]:
    """Every outcome of ``fn`` with its probability, by depth-first search over choice paths."""
    stack: list[list[int]] = [[]]
    while stack:
        script = stack.pop()
        ch = ScriptChooser(script)
        result = fn(ch)
        for j in range(len(script), len(ch.trace)):
            prefix = [c for _, c, _ in ch.trace[:j]]
            stack.extend(prefix + [alt] for alt in range(1, ch.trace[j][0]))
        yield math.prod(p for _, _, p in ch.trace), result, ch


# --------------------------------------------------------------------------- texts

# A text is a list of (word, tag) (stages/data/shard_format.py ``tag``); an image is a Scene.
Words = list[tuple[str, int]]
Scene = tuple[tuple[int, int], ...]  # (cell, entity rank), sorted by cell


def _template(*words: str) -> Words:
    return [(w, tag(0, TEMPLATE)) for w in words]


def name(W: World, r: int) -> Words:
    return [(w, tag(r, NAME)) for w in W.name_words(r)]


def listing(W: World, ranks: Sequence[int]) -> Words:
    """``we see A , B and C .``"""
    out = _template("we", "see")
    for i, r in enumerate(ranks):
        if i:
            out += _template("and" if i == len(ranks) - 1 else ",")
        out += name(W, r)
    return out + _template(".")


def fact(ch: Chooser, W: World, r: int) -> Words:
    """``A has <attribute> <value> .``: the attribute is a fresh choice; the value is A's."""
    f = ch.index(len(W.attributes), "text")
    v = W.values[W.value(r, f)]
    return (
        name(W, r)
        + _template("has")
        + [(W.attributes[f], tag(r, ATTRIBUTE)), (v, tag(r, VALUE))]
        + _template(".")
    )


def facts_about(ch: Chooser, W: World, ranks: Sequence[int], n: int) -> Words:
    """``n`` facts, each about one of the *distinct* entities ``ranks`` (already named)."""
    distinct = list(dict.fromkeys(ranks))
    out: Words = []
    for _ in range(n):
        out += fact(ch, W, distinct[ch.index(len(distinct), "text")])
    return out


# --------------------------------------------------------------------------- samples

Segment = Scene | Words


def _scene(cells: dict[int, int]) -> Scene:
    return tuple(sorted(cells.items()))


def _first_image(ch: Chooser, W: World) -> dict[int, int]:
    n = 1 + ch.index(W.w.max_entities, "image")
    cells = ch.subset(SLOTS, n, "none")
    return {c: ch.entity(W, in_image=True) for c in cells}


def caption_sample(ch: Chooser, W: World) -> list[Segment]:
    cells = _first_image(ch, W)
    ranks = [r for _, r in _scene(cells)]
    return [_scene(cells), listing(W, ranks) + facts_about(ch, W, ranks, W.w.caption_facts)]


def interleaved_sample(ch: Chooser, W: World) -> list[Segment]:
    cells = _first_image(ch, W)
    ranks = [r for _, r in _scene(cells)]
    segments: list[Segment] = [
        _scene(cells),
        listing(W, ranks) + facts_about(ch, W, ranks, W.w.story_facts),
    ]
    for _ in range(W.w.story_images - 1):
        kinds = ["arrives"] * (len(cells) < W.w.max_entities) + ["leaves"] * (len(cells) >= 2)
        kind = ch.pick(kinds, "image")
        if kind == "arrives":
            cell = ch.pick([c for c in range(SLOTS) if c not in cells], "none")
            r = cells[cell] = ch.entity(W, in_image=True)
        else:
            cell = ch.pick(sorted(cells), "none")  # the image shows which cell emptied
            r = cells.pop(cell)
            same = 1 + sum(x == r for x in cells.values())
            ch.note(0.0, -math.log(same / (len(cells) + 1)))  # the text names r, not the cell
        words = _template("then") + name(W, r) + _template(kind, ".")
        present = [x for _, x in _scene(cells)]
        segments += [_scene(cells), words + facts_about(ch, W, present, W.w.story_facts)]
    return segments


def text_sample(ch: Chooser, W: World) -> list[Segment]:
    words: Words = []
    for _ in range(W.w.text_facts):
        words += fact(ch, W, ch.entity(W, in_image=False))
    return [words]


SAMPLERS: dict[str, Callable[[Chooser, World], list[Segment]]] = {
    "caption": caption_sample,
    "interleaved": interleaved_sample,
    "text": text_sample,
}


# --------------------------------------------------------------------------- rendering

BACKGROUND = 28.0


def render(scene: Scene, W: World, rng: np.random.Generator | None) -> np.ndarray:
    """Draw a scene as an (S, S, 3) uint8 image: each entity fills its cell with its class
    colour and shows its visible code bits as a 4 x 4 grid of dark (0) and light (1) blocks
    (blocks past ``visual_bits`` are a neutral shade). ``rng`` adds pixel noise (``noise``, std
    on the 0-255 scale); ``None`` draws the canonical image."""
    return render_many([scene], W, rng)[0]


@functools.cache
def _cell_blocks(cell: int) -> np.ndarray:
    """Which block each pixel of a ``cell`` x ``cell`` image cell shows (BLOCK_GRID^2: none,
    the cell's colour): blocks inside a margin of cell // 8."""
    n, margin = BLOCK_GRID * BLOCK_GRID, cell // 8
    block = (cell - 2 * margin) // BLOCK_GRID
    blk = np.full((cell, cell), n)
    for b in range(n):
        by, bx = margin + (b // BLOCK_GRID) * block, margin + (b % BLOCK_GRID) * block
        blk[by : by + block, bx : bx + block] = b
    return blk


def render_many(scenes: Sequence[Scene], W: World, rng: np.random.Generator | None) -> np.ndarray:
    """:func:`render` of every scene, (B, S, S, 3): the noise drawn scene after scene as B
    separate calls would draw it, each cell's pixels in a few array operations (the codebook's
    look census draws 10^4-10^5 scenes)."""
    S, vb, n = W.w.image_size, W.w.visual_bits, BLOCK_GRID * BLOCK_GRID
    cell = S // 2
    blk = _cell_blocks(cell)
    palette = np.array([COLORS[name] for name in W.colors], dtype=np.float32)
    img = np.full((len(scenes), S, S, 3), BACKGROUND, dtype=np.float32)
    msb_first = np.arange(vb - 1, -1, -1)  # the visible bits' order, as World.look_bits
    for c in sorted({c for sc in scenes for c, _ in sc}):
        drawn = [(i, r) for i, sc in enumerate(scenes) for cc, r in sc if cc == c]
        idx = np.array([i for i, _ in drawn])
        look = W.looks[np.array([r for _, r in drawn]) - 1]  # class << vb | visible code bits
        shade = np.ones((len(drawn), n + 1), dtype=np.float32)  # (the cell's colour: x 1)
        shade[:, vb:n] = np.float32(0.65)
        shade[:, :vb] = np.where((look[:, None] >> msb_first) & 1, np.float32(1.0), np.float32(0.3))
        y0, x0 = (c // 2) * cell, (c % 2) * cell
        img[idx, y0 : y0 + cell, x0 : x0 + cell] = (
            palette[look >> vb][:, None, None, :] * shade[:, blk, None]
        )
    if rng is not None and W.w.noise > 0:
        img += rng.normal(0.0, W.w.noise, img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def png_bytes(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


# --------------------------------------------------------------------------- documents


def text_of(words: Words) -> tuple[str, list[int]]:
    """The text (words joined by single spaces) and its words' tags."""
    return " ".join(w for w, _ in words), [t for _, t in words]


def make_doc(kind: str, index: int, w: SyntheticCorpus, seed: int) -> Doc:
    """Sample ``index`` of ``kind``: a pure function of (params, seed, kind, index)."""
    W, kid = world(w, seed), KIND_IDS[kind]
    ch = Chooser(np.random.default_rng([seed, kid, index, 0]))
    segments = SAMPLERS[kind](ch, W)
    draw = np.random.default_rng([seed, kid, index, 1])
    texts, images, tags = [], [], []
    for s in segments:
        if isinstance(s, list):
            text, t = text_of(s)
            texts.append(text)
            tags.append(t)
            images.append(None)
        else:
            texts.append(None)
            tags.append(None)
            images.append(png_bytes(render(s, W, draw)))
    meta = {
        "entropy_nats": ch.nats,
        "entropy_nats_blind": ch.nats_blind,
        "word_tags": tags,
        "source": "synthetic",
    }
    return Doc(f"{kind}-{index:08d}", kind, texts, images, meta)


def generate(kind: str, w: SyntheticCorpus, seed: int) -> Iterator[Doc]:
    n = {"caption": w.n_caption, "interleaved": w.n_interleaved, "text": w.n_text}[kind]
    for i in range(n):
        yield make_doc(kind, i, w, seed)
