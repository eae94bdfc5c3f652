"""studies/paper.yaml: the paper's study as a complete params file. It validates, its plan
(before any data) has every Table 6 size with the paper's counts, lr and compute convention,
memory per GPU and GPU-hours; its data paths are placeholders that stop the data stages,
named, until they are set."""

from __future__ import annotations

import json

import pytest

from flows.grid.__main__ import main
from model.sizes import PAPER
from stages.common.inputs import Placeholder
from stages.common.paths import ROOT
from stages.data.ingest import expand
from stages.params import load_params

PAPER_STUDY = ROOT / "studies" / "paper.yaml"


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("paper")
    args = ["plan", "--params", str(PAPER_STUDY), "--shards", str(tmp / "none"),
            "--codebook", str(tmp / "none.pt"), "--results", str(tmp / "r"), "--json"]  # fmt: skip
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        assert main(args) == 0, err.getvalue()
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_the_preset_validates_as_the_paper_describes():
    p = load_params(PAPER_STUDY)
    assert p.grid.sizes == list(PAPER) and p.grid.archs == ["early", "late", "early-moe"]
    assert p.data.context_length == 1024 and p.shards.image_tokens == 256
    assert p.train.batch_rows_ref * p.data.context_length == 2**21  # ~2M tokens a step
    assert (p.train.adam_beta2, p.train.weight_decay, p.train.grad_clip) == (0.95, 1e-4, 1.0)
    assert p.train.cooldown_fraction == 0.2 and p.train.schedule == "wsd"
    assert p.train.sharding == "fsdp" and p.train.activation_checkpointing
    assert p.grid.mixtures["45-45-10"].as_dict() == {"caption": 0.45, "interleaved": 0.45,
                                                     "text": 0.10}  # fmt: skip
    assert p.model.count_embeddings and p.train.lr_source == "sizes"


def test_the_plan_has_the_papers_counts_compute_memory_and_gpu_hours(rows):
    p = load_params(PAPER_STUDY)
    assert len(rows) == 3 * 6 * len(p.grid.tokens)
    share = p.plan.image_share
    for r in rows:
        assert r["point_id"] is None and r["vocab_source"] == "params"
        if r["arch"] == "late":  # 6(N_v D_v + N D), D_v the image tokens the encoder sees
            assert r["C"] == pytest.approx(6 * (r["N_v"] * share * r["D"] + r["N"] * r["D"]))
        else:  # 6ND, MoE with the active N
            assert r["N_v"] == 0 and r["C"] == pytest.approx(6 * r["N"] * r["D"])
        assert 0 < r["memory_gib"] <= p.plan.gpu_memory_gib and r["gpu_hours"] > 0
        assert r["gpu_hours_trained"] <= r["gpu_hours"]
        assert r["batch_tokens"] == 2**21 and r["depth"] == 24
    early = {r["size"]: r for r in rows if r["arch"] == "early"}
    moe = {r["size"]: r for r in rows if r["arch"] == "early-moe"}
    assert early["paper-3b4"]["N"] == pytest.approx(3.35e9, rel=0.03)
    assert moe["paper-3b4"]["N"] == pytest.approx(early["paper-3b4"]["N"], rel=0.001)
    assert moe["paper-3b4"]["memory_gib"] > early["paper-3b4"]["memory_gib"]  # 8 experts held
    assert early["paper-932m"]["lr"] == 5e-4
    warm = {r["arch"]: r["warmup_steps"] for r in rows if r["size"] == "paper-275m"}
    assert warm == {"early": 1000, "late": 1000, "early-moe": 2500}  # the paper's warm-ups


def test_the_data_paths_are_placeholders_that_stop_the_data_stages_named():
    p = load_params(PAPER_STUDY)
    for kind in ("caption", "interleaved", "text"):
        with pytest.raises(Placeholder, match=rf"corpus.files.{kind}\[0\] is the placeholder"):
            expand(getattr(p.corpus.files, kind), kind)
    assert p.tokenizer.path.startswith("<")


def test_the_install_pins_torch_without_a_build_suffix():
    """A plain package index serves torch==2.13.0 as the CPU build here and as the CUDA build
    on a GPU machine: the lock must not force either."""
    pins = [line for line in (ROOT / "requirements.lock").read_text().splitlines()
            if line.startswith("torch==")]  # fmt: skip
    assert pins == ["torch==2.13.0"]
    assert '"torch==2.13.0"' in (ROOT / "pyproject.toml").read_text()
