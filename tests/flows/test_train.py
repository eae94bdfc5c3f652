"""flows/train.py: the recipe, cooldown branching, resume after kill -9, failure records."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from flows.train import Point, point_id, schedule, train_point
from stages.params import TrainParams, validate_params

TINY_TRAIN = {
    "grid": {"archs": ["early"], "sizes": ["xxs"], "tokens": [2048, 4096]},
    "train": {
        "warmup_tokens_ref": 512,
        "eval_every_tokens": 1024,
        "eval_batches": 2,
        "checkpoint_every_steps": 2,
    },
    "data": {"context_length": 64},
}


def tiny_params(tiny_data, **train):
    raw = json.loads(json.dumps(TINY_TRAIN))
    raw["train"] |= train
    raw |= {
        k: v
        for k, v in json.loads(tiny_data.params.model_dump_json()).items()
        if k in ("corpus", "tokenizer", "shards")
    }
    return validate_params(raw)


def _train(tiny_data, params, workdir, tokens, **kw):
    point = Point("early", "xxs", tokens, "45-45-10", 0)
    return train_point(point, params, shards=tiny_data.shards, codebook=None, workdir=workdir, **kw)


LOSSES = ("loss_caption", "loss_interleaved", "loss_text", "loss_avg", "train_loss")


def test_schedule_is_a_function_of_n_with_a_1_minus_sqrt_cooldown():
    tp = TrainParams()
    small, big = schedule(400_000, 50_000, tp, 256), schedule(400_000, 2_000_000, tp, 256)
    assert small.lr > big.lr and small.batch_rows <= big.batch_rows
    s = schedule(100 * 8 * 256, 100_000, tp, 256)
    assert s.cooldown_start == s.steps - round(0.2 * s.steps)
    lrs = [s.lr_at(i) for i in range(s.steps)]
    assert lrs[0] < lrs[s.warmup_steps] == pytest.approx(s.lr)  # warmup, then constant
    assert lrs[s.cooldown_start] == pytest.approx(s.lr) and lrs[-1] < 0.25 * s.lr
    mid = s.cooldown_start + (s.steps - s.cooldown_start) // 4
    frac = (mid - s.cooldown_start) / (s.steps - s.cooldown_start)
    assert lrs[mid] == pytest.approx(s.lr * (1 - frac**0.5))


def test_point_id_tracks_what_changes_the_result(tiny_data):
    p = tiny_params(tiny_data)
    pt = Point("early", "xxs", 2048, "45-45-10", 0)
    same = point_id(pt, tiny_params(tiny_data, threads=2, checkpoint_every_steps=7), "fp")
    assert point_id(pt, p, "fp") == same
    assert point_id(pt, tiny_params(tiny_data, lr_ref=1e-3), "fp") != same
    assert point_id(pt, p, "other-data") != same
    assert point_id(Point("early", "xxs", 4096, "45-45-10", 0), p, "fp") != same


def test_a_branched_cooldown_equals_a_separately_trained_point(tiny_data, tmp_path):
    branched = tiny_params(tiny_data, branch_cooldowns=True)
    separate = tiny_params(tiny_data, branch_cooldowns=False)
    for tokens in (2048, 4096):  # the trunk serves both budgets
        a = _train(tiny_data, branched, tmp_path / "branched", tokens)
        b = _train(tiny_data, separate, tmp_path / "separate", tokens)
        assert a["status"] == b["status"] == "ok"
        assert a["point_id"] == b["point_id"]  # branching does not change the result
        for k in LOSSES:
            assert a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-7), k
        assert a["D"] == b["D"] == tokens and a["steps"] == b["steps"]
    trunk = list((tmp_path / "branched" / "groups").glob("*/branch-*.pt"))
    assert len(trunk) == 2  # one checkpoint per budget's cooldown start


def test_a_nan_loss_is_recorded_as_failed(tiny_data, tmp_path):
    rec = _train(tiny_data, tiny_params(tiny_data), tmp_path, 2048, fail_at_step=2)
    assert rec["status"] == "failed" and "non-finite" in rec["error"] and "step 2" in rec["error"]
    saved = json.loads(next((tmp_path / "points").glob("*/record.json")).read_text())
    assert saved["status"] == "failed"


@pytest.mark.slow
def test_kill_9_then_rerun_gives_the_same_metrics(tiny_data, tmp_path):
    params = tiny_params(tiny_data, checkpoint_every_steps=1)
    ref = _train(tiny_data, params, tmp_path / "ref", 4096)
    raw = json.loads(params.model_dump_json())
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    point = json.dumps(Point("early", "xxs", 4096, "45-45-10", 0).to_dict())
    cmd = [
        sys.executable,
        "-m",
        "flows.train",
        "--point",
        point,
        "--params",
        str(tmp_path / "params.yaml"),
        "--shards",
        str(tiny_data.shards),
        "--workdir",
        str(tmp_path / "killed"),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    work = tmp_path / "killed"
    while time.time() < deadline and not list(work.glob("groups/*/trunk-latest.pt")):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not list(work.glob("points/*/record.json"))  # it really died before the end
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    rec = json.loads(out.stdout.strip().splitlines()[-1])
    for k in LOSSES:
        assert rec[k] == pytest.approx(ref[k], rel=1e-6, abs=1e-7), k

    def steps(root):
        lines = next(root.glob("points/*/metrics.jsonl")).read_text().splitlines()
        return [json.loads(line)["step"] for line in lines]

    assert steps(work) == steps(tmp_path / "ref")  # resumed curve: no gap, no duplicate


def test_a_moe_point_records_which_experts_see_image_and_text_tokens(tiny_data, tmp_path):
    params = tiny_params(tiny_data)
    for arch in ("early-moe", "early-moe-aware"):
        point = Point(arch, "xxs", 2048, "45-45-10", 0)
        rec = train_point(
            point, params, shards=tiny_data.shards, codebook=None, workdir=tmp_path / arch
        )
        routing = json.loads(
            (tmp_path / arch / "points" / rec["point_id"] / "routing.json").read_text()
        )
        assert routing["arch"] == arch and len(routing["layers"]) == rec["depth"]
        for layer in routing["layers"]:
            assert len(layer["image"]) == params.model.n_experts
            assert sum(layer["image"]) == pytest.approx(1) == sum(layer["text"])
            assert layer["image_tokens"] > 0 and layer["text_tokens"] > 0
            if arch == "early-moe-aware":  # image tokens only reach the image experts
                n_img = sum(1 for x in layer["image"] if x > 0)
                assert n_img < params.model.n_experts
                assert all(
                    t == 0 for x, t in zip(layer["image"], layer["text"], strict=True) if x > 0
                )
    dense = _train(tiny_data, params, tmp_path / "dense", 2048)
    assert not (tmp_path / "dense" / "points" / dense["point_id"] / "routing.json").exists()
