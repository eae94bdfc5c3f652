"""flows/plan.py: a point's id knows its run config, data and code; the dry run prints the plan
(before any data exists, too).

Code edits are made in a copy of the fingerprinted files (flows/plan.py CODE) under a temp root:
a comment, docstring or formatting edit changes no id; a changed constant changes the ids of
the variants that run the file, and only those."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from flows import records
from flows.config import Point, RunConfig
from flows.grid.__main__ import main
from flows.plan import CODE, NOT_RESULTS, code_files, fingerprints, group_id, plan
from model.archs import VARIANTS
from stages.common.paths import ROOT
from stages.params import load_params, study_params
from tests import import_graph as ig
from tests.flows.conftest import write_params

ALL = {"grid": {"archs": list(VARIANTS), "sizes": ["xxs"], "tokens": [2048, 4096]}}


def _copy_code(root: Path) -> Path:
    for entry in CODE:
        src = ROOT / entry
        if src.is_dir():
            shutil.copytree(src, root / entry, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (root / entry).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, root / entry)
    return root


def _ids(params, shards: Path, root: Path) -> dict[str, str]:
    return {j.label: j.point_id for j in plan(params, fingerprints(shards, None, root))}


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))


@pytest.fixture
def code(tmp_path) -> Path:
    return _copy_code(tmp_path / "code")


def test_comment_docstring_and_formatting_edits_change_no_id(tiny_data, code):
    params = study_params(ALL)
    before = _ids(params, tiny_data.shards, code)
    layers = code / "model" / "layers.py"
    _edit(
        layers,
        '"""Dense FFN: w2(silu(w1 x) * w3 x), no biases (Shazeer 2020)."""',
        '"""Reworded."""',
    )
    _edit(
        layers,
        "class RMSNorm(nn.Module):\n",
        "# a comment\nclass RMSNorm(nn.Module):  # another\n\n",
    )
    _edit(code / "flows" / "training" / "loop.py", "    cfg, save_at = ", "    cfg,   save_at = ")
    assert _ids(params, tiny_data.shards, code) == before


def test_a_changed_constant_in_a_model_file_changes_every_id(tiny_data, code):
    params = study_params(ALL)
    before = _ids(params, tiny_data.shards, code)
    _edit(code / "model" / "layers.py", "eps: float = 1e-5", "eps: float = 1e-6")
    after = _ids(params, tiny_data.shards, code)
    assert set(after) == set(before) and all(after[k] != before[k] for k in before)


@pytest.mark.parametrize(
    ("path", "old", "new", "touched"),
    [
        (
            "model/moe.py",
            "logits.dtype, torch.float32",
            "logits.dtype, torch.float64",
            lambda v: v.moe,
        ),
        ("model/discrete.py", "1 << 20", "1 << 21", lambda v: v.base == "discrete"),
        ("flows/training/run.py", "eps=1e-8", "eps=1e-7", lambda v: True),
        ("flows/config.py", "1.0 - math.sqrt(frac)", "1.0 - frac", lambda v: True),
    ],
    ids=["moe", "discrete", "optimizer", "lr-shape"],
)
def test_a_change_retrains_the_variants_that_run_the_file(tiny_data, code, path, old, new, touched):
    params = study_params(ALL)
    before = _ids(params, tiny_data.shards, code)
    _edit(code / path, old, new)
    after = _ids(params, tiny_data.shards, code)
    for label, pid in before.items():
        arch = label.split("-xxs-")[0]
        assert (after[label] != pid) == touched(VARIANTS[arch]), label


def test_settings_and_data_change_the_ids_of_the_variants_that_use_them(tiny_data, tmp_path):
    params = study_params(ALL)
    fp = fingerprints(tiny_data.shards, None)
    before = {j.label: j.point_id for j in plan(params, fp)}
    moe = {j.label: j.point_id for j in plan(study_params(ALL, {"model": {"n_experts": 4}}), fp)}
    enc = {
        j.label: j.point_id for j in plan(study_params(ALL, {"model": {"enc_lr_mult": 0.5}}), fp)
    }
    half = study_params(ALL, {"train": {"lr_arch_mult": {"late": 0.5}}})
    lr = {j.label: j.point_id for j in plan(half, fp)}
    codebook = tmp_path / "codebook.pt"
    codebook.write_bytes(b"codes")
    cb = {j.label: j.point_id for j in plan(params, fingerprints(tiny_data.shards, codebook))}
    for label, pid in before.items():
        v = VARIANTS[label.split("-xxs-")[0]]
        assert (moe[label] != pid) == v.moe, label
        assert (enc[label] != pid) == (v.base == "late"), label
        assert (lr[label] != pid) == (label.split("-xxs-")[0] == "late"), label
        assert (cb[label] != pid) == (v.base == "discrete"), label
    # the arch's factor multiplies the lr law's value, for its points only
    info = json.loads((tiny_data.shards / "info.json").read_text())
    tp = half.train
    for arch in ("late", "early"):
        cfg = RunConfig.build(half, Point(arch, "xxs", 4096, "45-45-10", 0), info)
        law = tp.lr_ref * (cfg.counts.N / tp.n_ref) ** tp.lr_exponent
        want = law * (0.5 if arch == "late" else tp.lr_arch_mult.get(arch, 1.0))
        assert cfg.schedule.lr == pytest.approx(want), arch


def test_a_sweep_of_expert_counts_adds_moe_points_and_keeps_the_ids_it_shares(tiny_data):
    fp = fingerprints(tiny_data.shards, None)
    before = {j.label: j.point_id for j in plan(study_params(ALL), fp)}
    swept = study_params(ALL, {"grid": {"experts": [4, 8]}})
    jobs = {j.label: j for j in plan(swept, fp)}
    for label, pid in before.items():
        arch, rest = label.split("-xxs-")
        if not VARIANTS[arch].moe:
            assert jobs[label].point_id == pid  # dense points: untouched
            continue
        assert label not in jobs
        # model.n_experts is 8: the 8-expert point of the sweep IS the point trained without it
        assert jobs[f"{arch}-e8-xxs-{rest}"].point_id == pid
        four = jobs[f"{arch}-e4-xxs-{rest}"]
        assert four.point_id != pid and four.point.experts == 4
        assert four.config.model.moe.n_experts == 4
        assert four.config.moe_fields() == {"n_experts": 4, "top_k": 1, "sparsity": 0.75}
    assert len(jobs) == len(before) + sum(VARIANTS[a].moe for a in VARIANTS) * 2


def test_a_group_is_its_points_without_the_budget(tiny_data):
    params = study_params(ALL)
    jobs = plan(params, fingerprints(tiny_data.shards, None))
    by_group: dict[str, list] = {}
    for j in jobs:
        by_group.setdefault(j.group_id, []).append(j)
        assert j.group_id == group_id(j.config, fingerprints(tiny_data.shards, None))
    assert len(by_group) == len(VARIANTS) and all(len(g) == 2 for g in by_group.values())
    assert len({j.point_id for j in jobs}) == len(jobs)


def test_the_fingerprint_covers_every_module_the_point_process_runs():
    """What flows.train imports is either fingerprinted or listed, with a reason, as unable to
    change a point's numbers; nothing is both, and nothing listed is missing."""
    ran = {ig.path_of(m) for m in ig.closure("flows.train")}
    fingerprinted = set(code_files())
    assert ran - fingerprinted - set(NOT_RESULTS) == set()
    assert not fingerprinted & set(NOT_RESULTS)
    assert all((ROOT / f).is_file() for f in NOT_RESULTS)
    assert "flows/ui.py" not in fingerprinted and "stages/scaling/law.py" not in fingerprinted


def test_the_dry_run_prints_every_point_with_its_ids_and_status(tiny_data, tmp_path, capsys):
    params_path = write_params(tmp_path / "params.yaml")
    jobs = plan(load_params(params_path), fingerprints(tiny_data.shards, None))
    results = tmp_path / "results"
    records.write_record(results, jobs[0].point_id, {"point_id": jobs[0].point_id, "status": "ok"})
    args = ["plan", "--params", str(params_path), "--shards", str(tiny_data.shards)]
    args += ["--codebook", str(tmp_path / "none.pt"), "--results", str(results)]
    assert main(args) == 0
    out, err = capsys.readouterr()
    header, *lines = [line.split() for line in out.splitlines()]
    assert header == ["point_id", "label", "N", "D", "C", "steps", "batch_tokens", "lr",
                      "memory_gib", "gpu_hours", "status"]  # fmt: skip
    assert [(x[0], x[1]) for x in lines] == [(j.point_id, j.label) for j in jobs]
    assert [x[-1] for x in lines] == ["done"] + ["train"] * (len(jobs) - 1)
    assert [int(x[2]) for x in lines] == [j.config.counts.N for j in jobs]
    assert f"{len(jobs)} points: 1 done, {len(jobs) - 1} to train" in err
    assert main([*args, "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    for row, j in zip(rows, jobs, strict=True):
        c = j.config
        assert (row["point_id"], row["group_id"], row["label"]) == (j.point_id, j.group_id, j.label)
        assert (row["N"], row["D"], row["steps"]) == (c.counts.N, j.point.tokens, c.schedule.steps)
        assert row["lr"] == c.schedule.lr and row["batch_tokens"] == c.batch_tokens
        assert row["C"] == pytest.approx(c.compute()) and row["vocab_source"] == "shards"
    assert [r["status"] for r in rows] == ["done"] + ["train"] * (len(jobs) - 1)
    assert not (results / "runs.parquet").exists()  # nothing trained, nothing written


def test_the_dry_run_works_before_any_data_exists(tiny_data, tmp_path, capsys):
    """A fresh clone: no shards, no codebook. The plan has every point's N, D, C, schedule and
    lr (none of them depend on the data: N excludes the embeddings), and no ids yet."""
    params_path = write_params(tmp_path / "params.yaml", grid={"archs": list(VARIANTS)})
    args = ["plan", "--params", str(params_path), "--shards", str(tmp_path / "no-shards")]
    args += ["--codebook", str(tmp_path / "none.pt"), "--results", str(tmp_path / "r"), "--json"]
    assert main(args) == 0
    out, err = capsys.readouterr()
    before = [json.loads(line) for line in out.splitlines()]
    assert "no shards yet" in err
    assert all(r["point_id"] is None and r["status"] == "train" for r in before)
    assert all(r["vocab_source"] == "params" for r in before)
    with_data = ["plan", "--params", str(params_path), "--shards", str(tiny_data.shards)]
    assert main([*with_data, *args[5:]]) == 0
    after = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    same = ("label", "N", "N_v", "D", "steps", "batch_tokens", "lr", "warmup_steps")
    assert [{k: r[k] for k in same} for r in before] == [{k: r[k] for k in same} for r in after]
    assert all(r["point_id"] for r in after)


def test_the_point_process_reads_its_run_config_not_params(tiny_data, tmp_path):
    """The config printed by ``plan --configs`` round-trips through JSON to the same object,
    and the point process (flows/train.py) imports no parser of params.yaml."""
    params_path = write_params(tmp_path / "params.yaml")
    jobs = plan(load_params(params_path), fingerprints(tiny_data.shards, None))
    for j in jobs:
        assert type(j.config).from_json(j.config.to_json()) == j.config
    source = (ROOT / "flows" / "train.py").read_text()
    assert "load_params" not in source and "read_yaml" not in source


def test_a_parse_that_met_another_threads_parse_is_retried(monkeypatch):
    """CPython 3.11 shares the AST converter's depth counter between threads: a parse that
    overlaps a foreign one raises SystemError. The digest retries it; other errors propagate."""
    import ast

    from flows import plan as plan_mod

    source = (ROOT / "flows/config.py").read_text()
    want = plan_mod.source_digest(source)
    real = ast.parse
    failures = iter([True, True])

    def flaky(src, *a, **kw):
        if next(failures, False):
            raise SystemError("AST constructor recursion depth mismatch (before=51, after=77)")
        return real(src, *a, **kw)

    monkeypatch.setattr(plan_mod.ast, "parse", flaky)
    assert plan_mod.source_digest(source) == want

    def broken(src, *a, **kw):
        raise SystemError("something else")

    monkeypatch.setattr(plan_mod.ast, "parse", broken)
    with pytest.raises(SystemError, match="something else"):
        plan_mod.source_digest(source)
