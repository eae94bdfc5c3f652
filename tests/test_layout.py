"""The layout reads as the architecture: dependencies run one way with no cycle, every DVC stage
lists what its command runs, every imported package is declared, and nothing cites a file that
is not in the repository."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions

import yaml

from tests import import_graph as ig

ROOT = ig.ROOT
# model/ <- stages/common, stages/params + stages/data (+ the law families and forms it names)
# <- flows/, stages/scaling <- reporting <- the entry points (stages/*.py, python -m flows.grid
# ...). A module imports its own layer or below.
LAYERS = [
    ("model", 0),
    ("stages.common", 0),
    ("stages.data", 1),
    ("stages.params", 1),
    ("stages.scaling.families", 1),  # the law-family registry the params schema reads
    ("stages.scaling.law", 1),
    ("flows", 2),
    ("stages.scaling", 2),
    ("stages.reporting", 3),
]
ENTRY_POINTS = {"stages.corpus", "stages.tokenizer", "stages.shards", "stages.codebook",
                "stages.fit", "stages.report", "flows.grid.__main__", "flows.pool.__main__",
                "flows.train", "flows.ui"}  # fmt: skip


def _layer(module: str) -> tuple[str, int]:
    if module in ENTRY_POINTS:
        return "entry", 9
    return max(((p, r) for p, r in LAYERS if module == p or module.startswith(p + ".")),
               key=lambda x: len(x[0]))  # fmt: skip


def test_no_import_cycle_among_the_projects_modules():
    assert ig.cycles() == []


def test_dependencies_run_one_way():
    wrong = []
    for m in ig.modules():
        if m.endswith("__init__") or m in ("model", "stages", "flows"):
            continue
        layer, rank = _layer(m)
        for n in ig.imports(m):
            other, other_rank = _layer(n)
            sideways = {layer, other} == {"flows", "stages.scaling"}
            if other_rank > rank or sideways or (other == "entry" and n != m):
                wrong.append(f"{m} ({layer}) imports {n} ({other})")
    assert not wrong, "\n".join(wrong)


def test_model_imports_nothing_of_the_pipeline():
    for m in ig.modules():
        if m.startswith("model"):
            assert all(n.startswith("model") for n in ig.imports(m)), m


def _covered(path: str, deps: list[str]) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in deps)


def test_every_stage_lists_the_code_its_command_runs():
    """A code edit reruns exactly the stages that run that code (flows/ui.py never the grid).
    The one exception is documented in dvc.yaml: the params schema takes allowed names from
    model/archs.py, model/sizes.py and stages/scaling/families.py (and what they import), which
    only the stages that run models or fits list (shards: model/config.py's image_tokens is
    real work)."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    registries = ig.closure("model.archs") | ig.closure("model.sizes")
    registries |= ig.closure("stages.scaling.families")
    for name, stage in stages.items():
        deps = [d if isinstance(d, str) else next(iter(d)) for d in stage["deps"]]
        entry = re.match(r"python -m ([\w.]+)", stage["cmd"]).group(1)
        if f"{entry}.__main__" in ig.modules():  # python -m of a package runs its __main__
            entry = f"{entry}.__main__"
        ran = ig.closure(entry)
        if entry == "flows.grid.__main__":
            ran |= ig.closure("flows.train")  # one process per point
        ran -= registries - ({"model.config"} if name == "shards" else set())
        missing = sorted(ig.path_of(m) for m in ran if not _covered(ig.path_of(m), deps))
        assert not missing, f"stage {name} runs {missing} without listing them"
    grid_deps = [d if isinstance(d, str) else next(iter(d)) for d in stages["grid"]["deps"]]
    assert not _covered("flows/ui.py", grid_deps)


def _third_party(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"model", "stages", "flows", "tests", "bench"}


def test_every_imported_package_is_declared_in_pyproject():
    declared = {
        re.split(r"[<>=!~ \[]", d, maxsplit=1)[0].lower().replace("_", "-")
        for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    }
    dists = packages_distributions()
    missing = {}
    for path in ig.modules().values():
        for name in _third_party(ast.parse(path.read_text())):
            owners = {d.lower().replace("_", "-") for d in dists.get(name, [name])}
            if not owners & declared:
                missing[name] = path.relative_to(ROOT).as_posix()
    assert not missing, missing


CITED = re.compile(
    r"(?<![\w/.])((?:model|stages|flows|tests|bench|docs)/[\w./-]*\w\.(?:py|yaml|md|j2|json|png))"
)


def test_nothing_cites_a_file_that_is_not_in_the_repository():
    texts = [ROOT / "README.md", ROOT / "dvc.yaml", ROOT / "params.yaml", ROOT / "Makefile"]
    for d in ("model", "stages", "flows", "tests", "bench"):
        texts += sorted((ROOT / d).rglob("*.py")) + sorted((ROOT / d).rglob("*.j2"))
    texts += sorted((ROOT / "tests").rglob("*.yaml")) + sorted((ROOT / "docs").rglob("*.md"))
    missing = []
    for path in texts:
        for cited in CITED.findall(path.read_text()):
            if not (ROOT / cited).exists() and "*" not in cited:
                missing.append(f"{path.relative_to(ROOT)} cites {cited}")
    assert not missing, "\n".join(missing)
