"""The embedded default data: a seeded world of rendered scenes with exactly known text entropy.

A *scene* is a few objects on a ``grid × grid`` board; each object has a cell, a shape, a
colour and a size. Three kinds of samples, as in the paper's mixture:

- **caption**: one rendered scene, then a caption listing every group of identical objects
  (count, size, colour, shape, cells) and, when there are two objects with a unique
  description, one spatial relation between them;
- **interleaved**: a "story" of ``story_images`` scenes, each after the first differing from the
  previous one by one visible change (an object appears, disappears, moves or changes colour);
  the text after each image describes the first scene or the change just seen;
- **text**: the same kind of story with no images at all, ending with a summary of the final
  state ("Now there are ..."), which a model can only get right by tracking the changes.

Every random choice goes through a :class:`Chooser`. Choices whose outcome the images show
(the scene, the change) are *visible*; the others (wording, order of mention, which relation is
stated, and in text-only documents everything) are *hidden*. All choices are uniform and the text
is an injective function of the hidden choices given the images, so the sum of ``log k`` over the
hidden choices of a sample, recorded as ``meta["entropy_nats"]``, is the exact information the
text carries beyond the images: averaged over samples it is H(text | images), the floor of the
text loss that no model can beat. For captions and stories the number of options at each
hidden choice depends only on the images, so the recorded value is exactly H(text | this sample's
images). tests/stages/data/test_synthetic.py checks this by enumerating every outcome of a tiny world.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
from PIL import Image

from stages.data.corpus_format import Doc
from stages.params import SyntheticCorpus

T = TypeVar("T")

RGB = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 240),
    "yellow": (240, 220, 40),
    "magenta": (220, 50, 220),
    "cyan": (40, 220, 230),
    "white": (245, 245, 245),
    "orange": (250, 140, 20),
    "gray": (150, 150, 150),
    "pink": (250, 150, 190),
}
PLURAL = {"cross": "crosses"}
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
OPENERS = (
    "This image shows",
    "The picture shows",
    "Here we see",
    "We can see",
    "This scene contains",
    "In this image there are",
)
TRANSITIONS = ("Then", "Next,", "After that,", "Later,")
VERBS = {  # hidden choice of wording for each change
    "appear": ("appeared", "showed up"),
    "disappear": ("disappeared", "vanished"),
    "move": ("moved", "went"),
    "recolor": ("turned", "became"),
}
KIND_IDS = {"caption": 0, "interleaved": 1, "text": 2}


# --------------------------------------------------------------------------- random choices


class Chooser:
    """Makes uniform random choices and adds ``log k`` to :attr:`nats` for each hidden one."""

    def __init__(self, rng: np.random.Generator | None = None):
        self.rng = rng
        self.nats = 0.0
        self.trace: list[tuple[int, int]] = []  # (options, chosen) for every choice

    def _draw(self, k: int) -> int:
        return int(self.rng.integers(k))

    def index(self, k: int, hidden: bool) -> int:
        assert k >= 1, k
        i = self._draw(k) if k > 1 else 0
        self.trace.append((k, i))
        if hidden:
            self.nats += math.log(k)
        return i

    def pick(self, options: Sequence[T], hidden: bool) -> T:
        return options[self.index(len(options), hidden)]

    def permutation(self, items: Sequence[T], hidden: bool) -> list[T]:
        """A uniform permutation, as sequential picks (log n! nats if hidden)."""
        rest, out = list(items), []
        while rest:
            out.append(rest.pop(self.index(len(rest), hidden)))
        return out

    def subset(self, n: int, k: int, hidden: bool) -> tuple[int, ...]:
        """A uniform k-subset of range(n), sorted, as ONE choice among C(n, k) (unranked)."""
        rank = self.index(math.comb(n, k), hidden)
        out, x = [], 0
        for remaining in range(k, 0, -1):  # combinatorial unranking, lexicographic order
            while math.comb(n - x - 1, remaining - 1) <= rank:
                rank -= math.comb(n - x - 1, remaining - 1)
                x += 1
            out.append(x)
            x += 1
        return tuple(out)


class ScriptChooser(Chooser):
    """Follows a fixed script of choices, then takes option 0 (for exhaustive enumeration)."""

    def __init__(self, script: Sequence[int]):
        super().__init__(None)
        self.script = list(script)

    def _draw(self, k: int) -> int:
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
            prefix = [c for _, c in ch.trace[:j]]
            stack.extend(prefix + [alt] for alt in range(1, ch.trace[j][0]))
        yield math.prod(1.0 / k for k, _ in ch.trace), result, ch


# --------------------------------------------------------------------------- the world


@dataclass(frozen=True, order=True)
class Obj:
    cell: int
    size: str
    color: str
    shape: str

    @property
    def desc(self) -> tuple[str, str, str]:
        return (self.size, self.color, self.shape)


Scene = tuple[Obj, ...]  # sorted by cell


def sample_scene(ch: Chooser, w: SyntheticCorpus, hidden: bool) -> Scene:
    n = 1 + ch.index(w.max_objects, hidden)
    cells = ch.subset(w.grid * w.grid, n, hidden)
    return tuple(
        Obj(c, ch.pick(w.sizes, hidden), ch.pick(w.colors, hidden), ch.pick(w.shapes, hidden))
        for c in cells
    )


def cell_name(grid: int, cell: int) -> str:
    r, c = divmod(cell, grid)
    if grid == 2:
        return f"{('top', 'bottom')[r]} {('left', 'right')[c]}"
    if grid == 3:
        name = f"{('top', 'middle', 'bottom')[r]} {('left', 'center', 'right')[c]}"
        return "center" if name == "middle center" else name
    return f"row {r + 1} column {c + 1}"


def _noun(shape: str, count: int) -> str:
    return shape if count == 1 else PLURAL.get(shape, shape + "s")


def _join(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def groups(scene: Scene) -> dict[tuple[str, str, str], list[int]]:
    """Identical objects grouped: description -> sorted cells (in order of first cell)."""
    out: dict[tuple[str, str, str], list[int]] = {}
    for o in scene:
        out.setdefault(o.desc, []).append(o.cell)
    return out


def _group_phrase(desc, cells, grid: int, number: str) -> str:
    size, color, shape = desc
    where = _join(["the " + cell_name(grid, c) for c in cells])
    return f"{number} {size} {color} {_noun(shape, len(cells))} at {where}"


def _number(count: int, ch: Chooser | None) -> str:
    """Count as a word or a digit: a hidden choice when a chooser is given."""
    forms = ("a", "one") if count == 1 else (NUMBER_WORDS[count], str(count))
    return forms[ch.index(2, hidden=True)] if ch is not None else forms[0]


def _the(desc: tuple[str, str, str]) -> str:
    return "the " + " ".join(desc)


def relation(a: Obj, b: Obj, grid: int) -> str:
    (ra, ca), (rb, cb) = divmod(a.cell, grid), divmod(b.cell, grid)
    vert = "above" if ra < rb else "below" if ra > rb else ""
    horiz = "to the left of" if ca < cb else "to the right of" if ca > cb else ""
    return f"{vert} and {horiz}" if vert and horiz else vert or horiz


def describe(scene: Scene, ch: Chooser, w: SyntheticCorpus) -> str:
    """A caption: hidden opener, order of groups, number forms and which relation is stated."""
    g = groups(scene)
    order = ch.permutation(list(g), hidden=True)
    listed = _join([_group_phrase(d, g[d], w.grid, _number(len(g[d]), ch)) for d in order])
    text = f"{ch.pick(OPENERS, hidden=True)} {listed}."
    singles = [o for o in scene if len(g[o.desc]) == 1]
    if len(singles) >= 2:
        pairs = [(a, b) for a in singles for b in singles if a != b]
        a, b = ch.pick(pairs, hidden=True)
        text += f" {_the(a.desc).capitalize()} is {relation(a, b, w.grid)} {_the(b.desc)}."
    return text


def summary(scene: Scene, w: SyntheticCorpus) -> str:
    """The final state in a canonical wording: fully determined by the scene."""
    g = groups(scene)
    verb = "is" if len(next(iter(g.values()))) == 1 else "are"
    return (
        f"Now there {verb} "
        + _join(
            [_group_phrase(d, cells, w.grid, _number(len(cells), None)) for d, cells in g.items()]
        )
        + "."
    )


NEIGHBOURS = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}


def change(scene: Scene, ch: Chooser, w: SyntheticCorpus, hidden: bool) -> tuple[Scene, str]:
    """One change of the scene and its sentence (without the transition word).

    What changes is ``hidden`` (text-only stories) or visible (it is in the next image); the verb
    is always a hidden choice.
    """
    g = groups(scene)
    occupied = {o.cell for o in scene}
    empty = [c for c in range(w.grid * w.grid) if c not in occupied]

    def ref(o: Obj) -> str:  # a unique referent: the cell is named when the description is shared
        where = "" if len(g[o.desc]) == 1 else f" at the {cell_name(w.grid, o.cell)}"
        return _the(o.desc) + where

    def moves(o: Obj) -> list[str]:
        r, c = divmod(o.cell, w.grid)
        return [
            d
            for d, (dr, dc) in NEIGHBOURS.items()
            if 0 <= r + dr < w.grid
            and 0 <= c + dc < w.grid
            and (r + dr) * w.grid + c + dc not in occupied
        ]

    # Some object always borders an empty cell (the grid is connected and max_objects < cells),
    # so "move" and "recolor" are always possible.
    movable = [(o, d) for o in scene for d in moves(o)]
    kinds = ["move", "recolor"]
    kinds += ["appear"] if len(scene) < w.max_objects else []
    kinds += ["disappear"] if len(scene) >= 2 else []
    kind = ch.pick(kinds, hidden)
    verb = ch.pick(VERBS[kind], hidden=True)
    rest = [o for o in scene]
    if kind == "appear":
        new = Obj(
            ch.pick(empty, hidden),
            ch.pick(w.sizes, hidden),
            ch.pick(w.colors, hidden),
            ch.pick(w.shapes, hidden),
        )
        article = "another" if new.desc in g else "a"
        text = f"{article} {' '.join(new.desc)} {verb} at the {cell_name(w.grid, new.cell)}."
        rest.append(new)
    elif kind == "disappear":
        o = ch.pick(scene, hidden)
        rest.remove(o)
        text = f"{ref(o)} {verb}."
    elif kind == "move":
        o, d = ch.pick(movable, hidden)
        dr, dc = NEIGHBOURS[d]
        rest.remove(o)
        rest.append(Obj(o.cell + dr * w.grid + dc, o.size, o.color, o.shape))
        text = f"{ref(o)} {verb} {d}."
    else:
        o = ch.pick(scene, hidden)
        color = ch.pick([c for c in w.colors if c != o.color], hidden)
        rest.remove(o)
        rest.append(Obj(o.cell, o.size, color, o.shape))
        text = f"{ref(o)} {verb} {color}."
    return tuple(sorted(rest)), text


def _with_transition(text: str, ch: Chooser) -> str:
    return f"{ch.pick(TRANSITIONS, hidden=True)} {text}"


# A sample is a list of segments in reading order: a Scene (an image) or a str (text).
Segment = Scene | str


def caption_sample(ch: Chooser, w: SyntheticCorpus) -> list[Segment]:
    scene = sample_scene(ch, w, hidden=False)
    return [scene, describe(scene, ch, w)]


def interleaved_sample(ch: Chooser, w: SyntheticCorpus) -> list[Segment]:
    scene = sample_scene(ch, w, hidden=False)
    segments: list[Segment] = [scene, describe(scene, ch, w)]
    for _ in range(w.story_images - 1):
        scene, text = change(scene, ch, w, hidden=False)
        segments += [scene, _with_transition(text, ch)]
    return segments


def text_sample(ch: Chooser, w: SyntheticCorpus) -> list[Segment]:
    scene = sample_scene(ch, w, hidden=True)
    sentences = [describe(scene, ch, w)]
    for _ in range(1 + ch.index(w.max_changes, hidden=True)):
        scene, text = change(scene, ch, w, hidden=True)
        sentences.append(_with_transition(text, ch))
    sentences.append(summary(scene, w))
    return [" ".join(sentences)]


SAMPLERS: dict[str, Callable[[Chooser, SyntheticCorpus], list[Segment]]] = {
    "caption": caption_sample,
    "interleaved": interleaved_sample,
    "text": text_sample,
}


# --------------------------------------------------------------------------- rendering

SUPERSAMPLE = 4


def render(scene: Scene, w: SyntheticCorpus, rng: np.random.Generator | None) -> np.ndarray:
    """Draw a scene as an (S, S, 3) uint8 image, anti-aliased by 4x supersampling.

    ``rng`` drives what the text never mentions (position jitter inside the cell, background
    shade, pixel noise); ``None`` draws the canonical image with none of them.
    """
    s = w.image_size * SUPERSAMPLE
    cell = s / w.grid
    shade = 28.0 + (rng.integers(0, 24) if rng is not None else 0)
    canvas = np.full((s, s, 3), shade, dtype=np.float32)
    for o in scene:
        r, c = divmod(o.cell, w.grid)
        jy, jx = rng.uniform(-w.jitter, w.jitter, 2) if rng is not None else (0.0, 0.0)
        cy, cx = (r + 0.5 + jy) * cell, (c + 0.5 + jx) * cell
        rad = cell * (0.36 if o.size == "large" else 0.2)
        # only the shape's bounding box is tested (shapes fit in the unit disc's box)
        y0, y1 = max(0, int(cy - rad) - 1), min(s, int(cy + rad) + 2)
        x0, x1 = max(0, int(cx - rad) - 1), min(s, int(cx + rad) + 2)
        ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float32) + 0.5
        mask = shape_mask(o.shape, (xs - cx) / rad, (ys - cy) / rad)
        canvas[y0:y1, x0:x1][mask] = RGB[o.color]
    img = canvas.reshape(w.image_size, SUPERSAMPLE, w.image_size, SUPERSAMPLE, 3).mean((1, 3))
    if rng is not None and w.noise > 0:
        img += rng.normal(0.0, w.noise, img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """Inside-test of a unit-radius shape centred at the origin (y grows downwards)."""
    if shape == "circle":
        return dx * dx + dy * dy <= 1.0
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) <= 0.85
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= 1.1
    if shape == "triangle":  # apex up, base at dy = 0.8
        return (dy <= 0.8) & (np.abs(dx) <= (dy + 1.0) / 1.8)
    if shape == "cross":
        ax, ay = np.abs(dx), np.abs(dy)
        return ((ax <= 0.33) & (ay <= 1.0)) | ((ay <= 0.33) & (ax <= 1.0))
    if shape == "ring":
        d2 = dx * dx + dy * dy
        return (d2 <= 1.0) & (d2 >= 0.3)
    raise ValueError(f"unknown shape {shape!r}")


def png_bytes(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


# --------------------------------------------------------------------------- samples


def make_doc(kind: str, index: int, w: SyntheticCorpus, seed: int) -> Doc:
    """Sample ``index`` of ``kind``: a pure function of (params, seed, kind, index)."""
    kid = KIND_IDS[kind]
    ch = Chooser(np.random.default_rng([seed, kid, index, 0]))
    segments = SAMPLERS[kind](ch, w)
    draw = np.random.default_rng([seed, kid, index, 1])
    texts = [s if isinstance(s, str) else None for s in segments]
    images = [None if isinstance(s, str) else png_bytes(render(s, w, draw)) for s in segments]
    meta = {"entropy_nats": ch.nats, "source": "synthetic"}
    return Doc(f"{kind}-{index:08d}", kind, texts, images, meta)


def generate(kind: str, w: SyntheticCorpus, seed: int) -> Iterator[Doc]:
    n = {"caption": w.n_caption, "interleaved": w.n_interleaved, "text": w.n_text}[kind]
    for i in range(n):
        yield make_doc(kind, i, w, seed)
