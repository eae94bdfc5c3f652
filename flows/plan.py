"""The grid's plan: its points, their run configs and identities, and the order they train in.

:func:`expand_grid` lists the points of ``params.grid`` (archs x sizes x mixtures x seeds x
tokens, a stable order); :func:`plan` gives each its run config (flows/config.py), its id and
group id; :func:`chains` orders the points that share a trunk. ``python -m flows.grid plan``
prints the plan without training.

**Identity.** A point's id hashes what its run config says decides its numbers
(:meth:`flows.config.RunConfig.identity`: coordinates, model, schedule, optimizer, mixture,
context, evaluation), the data (the shards' manifest, and the codebook for discrete variants),
and **the code** that turns them into numbers (:data:`CODE`). Cadence, threads and processes
are not in it. A record whose id matches is never trained again; any change to one of these
gives new ids, so the grid retrains exactly the points it touches, and a result made by other
code is never passed off as current. Before the data exists a point has no id (``None``).

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
- ``flows/config.py`` (the lr shape of the schedule) and ``flows/training/``: the step,
  evaluation, checkpoints, cooldown branching and the record.

Not in it (:data:`NOT_RESULTS`, checked by tests/flows/test_plan.py against what the point
process imports): code that computes ids, validates params (their values are hashed), writes
files, records provenance, or picks the device (recorded in each record). The data stages'
code is covered through the data it writes (the manifest holds every shard's sha256).
"""

from __future__ import annotations

import ast
import hashlib
import json
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path
from typing import Any

from flows.config import Point, RunConfig, check_batch_split
from model.archs import Variant, variant
from stages.common.inputs import digest, require, require_made_from, require_set
from stages.common.paths import ROOT
from stages.data.shard_format import join, load_info
from stages.params import Params

CODE = ("model", "stages/data/loader.py", "stages/data/shard_format.py", "stages/data/kinds.py",
        "flows/config.py", "flows/training")  # fmt: skip
# files of CODE that only some variants run
ONLY_FOR: dict[str, Callable[[Variant], bool]] = {
    "model/moe.py": lambda v: v.moe,
    "model/discrete.py": lambda v: v.base == "discrete",
}
# project modules the point process imports that cannot change a point's numbers, and why
NOT_RESULTS = {
    "model/flop_formulas.py": "FlopCounterMode formulas for tests and benchmarks",
    "flows/plan.py": "computes ids",
    "flows/memory.py": "sizes points before they run (memory per device, GPU-hours)",
    "stages/common/paths.py": "where the repository is",
    "stages/common/inputs.py": "checks that input files exist",
    "stages/common/processes.py": "processes that die with their parent",
    "flows/train.py": "the command line of the point process",
    "flows/records.py": "where records are written, and the runs table's columns",
    "flows/devices.py": "picks the device (recorded per point) and the MFU peak",
    "stages/params.py": "the schema: the values it validates are hashed into the id",
    "stages/scaling/families.py": "the law families' names, which the schema validates",
    "stages/scaling/law.py": "the laws the family registry builds; no point runs them",
    "stages/common/stage.py": "logging set-up and atomic file writes",
    "stages/common/provenance.py": "the git revision, recorded beside the fingerprint",
}


def check_inputs(params: Params, shards: Path, codebook: Path) -> None:
    """Before a grid trains: the shards exist, and for discrete archs a codebook made from
    them (stages/common/inputs.py errors name the file and the command that makes it); the
    checkpoint store set, not a study file's placeholder."""
    require_set("train.checkpoint_store", params.train.checkpoint_store)
    manifest = require(join(shards, "manifest.parquet"), "shards", "the shards' manifest")
    require(join(shards, "info.json"), "shards", "the shards' info")
    if any(variant(a).base == "discrete" for a in params.grid.archs):
        require(codebook, "codebook", "the visual codebook (arch discrete)")
        report = Path(codebook).parent / "report.json"
        made_from = (
            json.loads(report.read_text()).get("shards_manifest_sha256")
            if report.exists()
            else None
        )
        require_made_from(made_from, manifest, Path(codebook), "codebook")


def expand_grid(params: Params) -> list[Point]:
    g = params.grid
    return [
        Point(a, s, t, m, seed, e)
        for a in g.archs
        for e in (g.experts if g.experts and variant(a).moe else [None])
        for s, m, seed, t in product(g.sizes, g.mixtures, g.seeds, sorted(g.tokens))
    ]


# --------------------------------------------------------------------------- identity


_PARSE = threading.Lock()


def _parse(source: str, tries: int = 5) -> ast.Module:
    """``ast.parse``, safe beside other threads. CPython 3.11 keeps the AST converter's recursion
    depth in state shared by all threads (python/cpython#106905), so a parse that overlaps
    another thread's (a flow's, a library's) can fail with "AST constructor recursion depth
    mismatch". The lock keeps this module's parses apart; the depth is reset at each parse, so
    one that met a foreign parse is simply retried."""
    with _PARSE:
        for _ in range(tries - 1):
            try:
                return ast.parse(source)
            except SystemError as e:
                if "recursion depth mismatch" not in str(e):
                    raise
        return ast.parse(source)


def source_digest(source: str) -> str:
    """sha256 of a module's syntax tree without docstrings: comments, docstrings, blank lines
    and formatting do not count; a changed name, constant or statement does."""
    tree = _parse(source)
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


@dataclass(frozen=True)
class Fingerprints:
    """The data and code a grid's points are trained from (computed once per process)."""

    data: str | None  # sha256 of the shards' manifest (every shard's sha256); None: no data yet
    codebook: str | None  # sha256 of the visual codebook, if there is one
    files: dict[str, str] = field(repr=False)  # code file -> source_digest
    info: dict[str, Any] | None = field(default=None, repr=False)  # the shards' info.json

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
    """Fingerprints of the shards at ``shards`` (a folder or URL; none when they do not exist
    yet), the codebook file and the code under ``root``."""
    try:
        data = digest(join(shards, "manifest.parquet"))
    except FileNotFoundError:
        data = None
    info = load_info(shards) if data is not None else None
    cb = digest(codebook) if codebook is not None and Path(codebook).is_file() else None
    return Fingerprints(data, cb, _digests(Path(root).resolve()), info)


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def identity(cfg: RunConfig, fp: Fingerprints) -> dict[str, Any]:
    """Everything that decides the numbers of the point ``cfg`` trains."""
    arch = cfg.point.arch
    return {**cfg.identity(), "data": fp.data_for(arch), "code": fp.code(arch)}


def point_id(cfg: RunConfig, fp: Fingerprints) -> str | None:
    """Hash of everything that changes the point's result (None before the data exists)."""
    return _hash(identity(cfg, fp)) if fp.data is not None else None


def group_id(cfg: RunConfig, fp: Fingerprints) -> str | None:
    """The same without the token budget: the points of a group share one trunk (its warm-up
    and constant lr), whatever their budgets' lengths."""
    if fp.data is None:
        return None
    ident = identity(cfg, fp)
    del ident["point"]["tokens"]
    for k in ("steps", "cooldown_start"):
        del ident["schedule"][k]
    return _hash(ident)


# --------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Job:
    """A point of the plan: its run config, its ids and the fingerprint of its code."""

    config: RunConfig
    point_id: str | None
    group_id: str | None
    code: str

    @property
    def point(self) -> Point:
        return self.config.point

    @property
    def label(self) -> str:
        return self.point.label


def plan(params: Params, fp: Fingerprints) -> list[Job]:
    """Every point of the grid with its run config and ids, in expand_grid's stable order."""
    jobs = []
    for p in expand_grid(params):
        cfg = RunConfig.build(params, p, fp.info)
        jobs.append(Job(cfg, point_id(cfg, fp), group_id(cfg, fp), fp.code(p.arch)))
    return jobs


def check_plan(jobs: list[Job], params: Params) -> None:
    """Before anything starts: every point's batch splits over its processes and passes, and
    every point fits the stated memory per device (flows/memory.py). Raises ParamsError naming
    what to change."""
    from flows.memory import check_memory

    configs = [j.config for j in jobs]
    check_batch_split(configs)
    check_memory(configs, params)


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
    job = max(chain, key=lambda j: j.point.tokens)
    return job.point.tokens * (job.config.model.d_model + 6)
