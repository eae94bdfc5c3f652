"""Entry points check their inputs before any work: a missing input is named with the stage and
the command that make it (not a traceback from inside a library), and exits 2."""

from __future__ import annotations

import logging

import pytest

from stages import codebook, corpus, fit, report, shards, tokenizer
from stages.common.inputs import MissingInput, StaleInput, digest, require, require_made_from
from tests.conftest import write_study


@pytest.mark.parametrize(
    ("main", "args", "missing", "stage"),
    [
        (tokenizer.main, ["--corpus", "{tmp}/corpus"], "corpus/report.json", "corpus"),
        (shards.main, ["--corpus", "{tmp}/corpus", "--out", "{tmp}/s"], "corpus", "corpus"),
        (
            shards.main,
            ["--corpus", "{corpus}", "--tokenizer", "{tmp}/tok.json", "--out", "{tmp}/s"],
            "tok.json",
            "tokenizer",
        ),  # fmt: skip
        (
            codebook.main,
            ["--shards", "{tmp}/shards", "--out", "{tmp}/cb"],
            "manifest.parquet",
            "shards",
        ),  # fmt: skip
        (fit.main, ["--runs", "{tmp}/runs.parquet", "--no-mlflow"], "runs.parquet", "grid"),
        (report.main, ["--results", "{tmp}"], "runs.parquet", "grid"),
    ],
    ids=["tokenizer", "shards-corpus", "shards-tokenizer", "codebook", "fit", "report"],
)
def test_a_missing_input_names_the_file_and_the_stage_that_makes_it(
    tiny_data, tmp_path, caplog, main, args, missing, stage
):
    args = [a.format(tmp=tmp_path, corpus=tiny_data.corpus) for a in args]
    with caplog.at_level(logging.ERROR):
        assert main(args) == 2
    assert missing in caplog.text and f"dvc repro {stage}" in caplog.text
    assert not (tmp_path / "s").exists() and not (tmp_path / "cb").exists()  # no work done


def test_an_input_made_from_other_data_is_stale(tmp_path):
    made_from, other = tmp_path / "a.bin", tmp_path / "b.bin"
    made_from.write_bytes(b"one")
    other.write_bytes(b"two")
    require_made_from(digest(made_from), made_from, tmp_path / "out", "codebook")  # current: ok
    require_made_from(None, made_from, tmp_path / "out", "codebook")  # unrecorded: not checked
    with pytest.raises(StaleInput, match="dvc repro codebook"):
        require_made_from(digest(other), made_from, tmp_path / "out", "codebook")
    with pytest.raises(MissingInput, match=r"made by the stage 'fit'"):
        require(tmp_path / "fits.json", "fit")


def test_a_bad_params_file_stops_every_stage_naming_the_key(tmp_path, caplog):
    bad = write_study(tmp_path / "params.yaml", {"shards": {"patch_sise": 8}})
    for main in (corpus.main, tokenizer.main, shards.main, codebook.main, fit.main):
        caplog.clear()
        with caplog.at_level(logging.ERROR):
            assert main(["--params", str(bad)]) == 2, main.__module__
        assert "unknown key 'shards.patch_sise'" in caplog.text and "patch_size" in caplog.text


def test_bounded_keeps_everything_under_the_bound_and_a_seeded_ordered_sample_above():
    from stages.common.inputs import bounded

    items = [f"f{i:03d}" for i in range(100)]
    assert bounded(items, None, 0) == items == bounded(items, 100, 0)
    some = bounded(items, 10, 0)
    assert len(some) == 10 and some == sorted(some) and set(some) <= set(items)
    assert some == bounded(items, 10, 0) and some != bounded(items, 10, 1)
