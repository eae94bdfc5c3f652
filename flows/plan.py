"""The grid's plan: its points, their identities, and the order they train in.

:func:`expand_grid` lists the points of ``params.grid`` (archs x sizes x mixtures x seeds x
tokens, a stable order); :func:`plan` gives each its id and group id; :func:`chains` orders the
points that share a trunk. ``python -m flows.grid plan`` prints the plan without training.

**Identity.** A point's id covers its coordinates (arch, size, tokens, mixture, seed, expert count), the params that reach
its training (``model`` settings its variant uses, ``train`` minus cadence and threads, the
context length, its mixture), the data (the shards' manifest, and the codebook for discrete
variants), and **the code** that turns them into numbers (:data:`CODE`). A record whose id
matches is never trained again; any change to one of these gives new ids, so the grid retrains
exactly the points it touches, and a result made by other code is never passed off as current.

The code fingerprint hashes each file's syntax tree with docstrings dropped (comments never
reach the tree), so a comment, docstring or formatting edit changes no id, and a changed
constant changes the ids of the variants that run that file: model/moe.py only MoE variants,
model/discrete.py only discrete ones (:data:`ONLY_FOR`), every other file of :data:`CODE` all
of them. A point's *group* (the points that share one constant-lr trunk) has the same identity
without the token budget.

Which code, and why (:data:`CODE`):

- ``model/``: the architectures, MoE, N and FLOP counting (N sets lr, batch and warmup);
- ``stages/data/loader.py``, ``shard_format.py``, ``kinds.py``: how shards are read back and
  packed into the rows a point trains and is evaluated on;
- ``flows/training/``: the recipe, the step, evaluation, checkpoints, cooldown branching and the
  record.

Not in it (:data:`NOT_RESULTS`, checked by tests/flows/test_plan.py against what the point
process imports): code that computes ids, validates params (their values are hashed), writes
files, records provenance, or picks the device (recorded in each record). The data stages'
code is covered through the data it writes (the manifest holds every shard's sha256).
"""

from __future__ import annotations

import ast
import hashlib
import json
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from itertools import product
from pathlib import Path
from typing import Any

from model.archs import Variant, variant
from model.ladder import SIZES
from stages.params import Params

ROOT = Path(__file__).resolve().parents[1]
CODE = ("model", "stages/data/loader.py", "stages/data/shard_format.py", "stages/data/kinds.py",
        "flows/training")  # fmt: skip
# files of CODE that only some variants run
ONLY_FOR: dict[str, Callable[[Variant], bool]] = {
    "model/moe.py": lambda v: v.moe,
    "model/discrete.py": lambda v: v.base == "discrete",
}
# project modules the point process imports that cannot change a point's numbers, and why
NOT_RESULTS = {
    "model/flop_formulas.py": "FlopCounterMode formulas for tests and benchmarks",
    "flows/plan.py": "computes ids",
    "flows/train.py": "the command line of the point process",
    "flows/records.py": "where records are written, and the runs table's columns",
    "flows/devices.py": "picks the device (recorded per point) and the MFU peak",
    "stages/params.py": "the schema: the values it validates are hashed into the id",
    "stages/common/stage.py": "logging set-up and atomic file writes",
    "stages/common/provenance.py": "the git revision, recorded beside the fingerprint",
}
MOE_KEYS = ("n_experts", "top_k", "aux_loss_weight", "z_loss_weight")
# train params that do not change a point's numbers (kept out of its id)
# (processes: 1 and P processes train the same model up to float rounding, as two devices do:
# 1e-7 over the first steps, drifting to ~5e-4 over a tiny model's run, tests/flows/training/
# test_distributed.py)
NOT_IN_ID = ("threads", "eval_every_tokens", "checkpoint_every_steps", "branch_cooldowns",
             "log_every_steps", "processes")  # fmt: skip


@dataclass(frozen=True)
class Point:
    """One grid point's coordinates. ``experts``: the MoE expert count when the grid sweeps it
    (``grid.experts``); None means ``model.n_experts`` (and leaves the id as it was before the
    sweep existed)."""

    arch: str  # a variant name (model/archs.py)
    size: str  # a ladder size name (model/ladder.py)
    tokens: int  # D: decoder tokens to train on
    mixture: str  # a key of params.grid.mixtures
    seed: int
    experts: int | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["experts"] is None:
            del d["experts"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Point:
        return cls(**{k: d[k] for k in ("arch", "size", "tokens", "mixture", "seed")},
                   experts=d.get("experts"))  # fmt: skip

    @property
    def label(self) -> str:
        arch = self.arch if self.experts is None else f"{self.arch}-e{self.experts}"
        return f"{arch}-{self.size}-D{self.tokens}-{self.mixture}-s{self.seed}"


def expand_grid(params: Params) -> list[Point]:
    g = params.grid
    return [
        Point(a, s, t, m, seed, e)
        for a in g.archs
        for e in (g.experts if g.experts and variant(a).moe else [None])
        for s, m, seed, t in product(g.sizes, g.mixtures, g.seeds, sorted(g.tokens))
    ]


def for_point(point: Point, params: Params) -> Params:
    """The params ``point`` trains with: ``model.n_experts`` is its expert count if it has one."""
    if point.experts is None or point.experts == params.model.n_experts:
        return params
    model = params.model.model_copy(update={"n_experts": point.experts})
    return params.model_copy(update={"model": model})


def moe_fields(point: Point, params: Params) -> dict[str, Any]:
    """The runs-table fields of a MoE point's experts (none for a dense one): ``n_experts``,
    ``top_k`` and the sparsity S = 1 - top_k / n_experts (Abnar et al. 2025)."""
    if not variant(point.arch).moe:
        return {}
    m = for_point(point, params).model
    return {"n_experts": m.n_experts, "top_k": m.top_k, "sparsity": 1.0 - m.top_k / m.n_experts}


# --------------------------------------------------------------------------- identity


def source_digest(source: str) -> str:
    """sha256 of a module's syntax tree without docstrings: comments, docstrings, blank lines
    and formatting do not count; a changed name, constant or statement does."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (
            isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
            and body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)
        ):
            node.body = body[1:] or [ast.Pass()]
    return hashlib.sha256(ast.dump(tree).encode()).hexdigest()


def code_files(root: Path = ROOT) -> list[str]:
    """The Python files of :data:`CODE`, relative to ``root``, sorted."""
    files: set[str] = set()
    for entry in CODE:
        path = root / entry
        found = sorted(path.rglob("*.py")) if path.is_dir() else [path]
        files |= {p.relative_to(root).as_posix() for p in found if p.is_file()}
    return sorted(files - set(NOT_RESULTS))


def _digests(root: Path) -> dict[str, str]:
    """Read afresh on every call (~20 ms): a long-lived process sees the code as it is now."""
    return {f: source_digest((root / f).read_text()) for f in code_files(root)}


def file_digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@dataclass(frozen=True)
class Fingerprints:
    """The data and code a grid's points are trained from (computed once per process)."""

    data: str  # sha256 of the shards' manifest (which lists every shard's sha256)
    codebook: str | None  # sha256 of the visual codebook, if there is one
    files: dict[str, str] = field(repr=False)  # code file -> source_digest

    @property
    def all_code(self) -> str:
        """One hash of every file of :data:`CODE`."""
        return _hash(self.files)

    def code(self, arch: str) -> str:
        """The fingerprint of the code that trains ``arch``."""
        v = variant(arch)
        used = {f: d for f, d in self.files.items() if ONLY_FOR.get(f, lambda _: True)(v)}
        return _hash(used)

    def data_for(self, arch: str) -> dict[str, str | None]:
        """The data ``arch`` reads: the shards, and the codebook for discrete variants."""
        out: dict[str, str | None] = {"shards": self.data}
        if variant(arch).base == "discrete":
            out["codebook"] = self.codebook
        return out


def fingerprints(shards: Path, codebook: Path | None, root: Path = ROOT) -> Fingerprints:
    """Fingerprints of the shards at ``shards``, the codebook file and the code under ``root``."""
    data = file_digest(Path(shards) / "manifest.parquet")
    cb = file_digest(codebook) if codebook is not None and Path(codebook).is_file() else None
    return Fingerprints(data, cb, _digests(Path(root).resolve()))


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def identity(point: Point, params: Params, fp: Fingerprints) -> dict[str, Any]:
    """Everything that decides the numbers of ``point``."""
    v = variant(point.arch)
    model = for_point(point, params).model.model_dump()
    used = [*(MOE_KEYS if v.moe else ()), *(("enc_lr_mult",) if v.base == "late" else ())]
    train = {k: x for k, x in params.train.model_dump().items() if k not in NOT_IN_ID}
    coords = point.to_dict()
    coords.pop("experts", None)  # it is model.n_experts below: the 8-expert point of a sweep
    # is the point of a grid without one
    return {
        "point": coords,
        "mixture": params.grid.mixtures[point.mixture].as_dict(),
        "model": {k: model[k] for k in used},
        "train": train,
        "context_length": params.data.context_length,
        "data": fp.data_for(point.arch),
        "code": fp.code(point.arch),
    }


def point_id(point: Point, params: Params, fp: Fingerprints) -> str:
    """Hash of everything that changes the point's result."""
    return _hash(identity(point, params, fp))


def group_id(point: Point, params: Params, fp: Fingerprints) -> str:
    """The same without the token budget: the points of a group share one trunk."""
    ident = identity(point, params, fp)
    del ident["point"]["tokens"]
    return _hash(ident)


# --------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Job:
    """A point of the plan with its ids and the fingerprint of the code that trains it."""

    point: Point
    point_id: str
    group_id: str
    code: str

    @property
    def label(self) -> str:
        return self.point.label


def plan(params: Params, fp: Fingerprints) -> list[Job]:
    """Every point of the grid with its ids, in expand_grid's stable order."""
    return [
        Job(p, point_id(p, params, fp), group_id(p, params, fp), fp.code(p.arch))
        for p in expand_grid(params)
    ]


def chains(jobs: list[Job], shared_trunks: bool) -> list[deque[Job]]:
    """Jobs that must run one after another: a group's points in ascending tokens (they share
    the group's trunk checkpoints), or every point alone without cooldown branching; the
    longest chains first (:func:`chain_cost`), so the grid does not end on one long chain
    while the other slots idle."""
    if not shared_trunks:
        out = [deque([j]) for j in jobs]
    else:
        groups: dict[str, list[Job]] = {}
        for j in jobs:
            groups.setdefault(j.group_id, []).append(j)
        out = [deque(sorted(g, key=lambda j: j.point.tokens)) for g in groups.values()]
    return sorted(out, key=chain_cost, reverse=True)  # stable: ties keep the plan's order


def chain_cost(chain: deque[Job]) -> float:
    """Rough CPU time of a chain, for ordering only: its largest budget (a group's trunk runs
    to it; its cooldowns are a fraction) times (width + 6), the measured shape of a tiny
    model's step time on one thread (overheads make it grow like the width, not like N:
    bench/grid_summary.py)."""
    p = max(chain, key=lambda j: j.point.tokens).point
    return p.tokens * (SIZES[p.size] + 6)
