"""flows/training/ and the run config: the recipe, cooldown branching, resume after kill -9,
failure records, and checkpoints that only the code that wrote them may resume."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from flows.config import Point, RunConfig, schedule
from flows.devices import cpu_kernel_env
from flows.plan import fingerprints, point_id
from flows.train import main as train_main
from flows.training.checkpoints import Slot, Store
from flows.training.point import train_point
from flows.training.step import FAULT_ENV
from stages.data.kinds import TARGETS
from stages.data.shard_format import load_info
from stages.params import study_params

TINY_TRAIN = {
    "grid": {"archs": ["early"], "sizes": ["xxs"], "tokens": [2048, 4096]},
    "train": {
        "warmup_tokens_ref": 512,
        "eval_every_tokens": 1024,
        "eval_batches": 2,
        "checkpoint_every_steps": 2,
        "log_every_steps": 1,
    },
    "data": {"context_length": 64},
}


def tiny_params(tiny_data, **train):
    raw = json.loads(json.dumps(TINY_TRAIN))
    raw["train"] |= train
    data = json.loads(tiny_data.params.model_dump_json())
    return study_params({k: data[k] for k in ("corpus", "tokenizer", "shards")}, raw)


def config(tiny_data, params, point: Point) -> RunConfig:
    return RunConfig.build(params, point, load_info(tiny_data.shards))


def pid_of(tiny_data, params, point: Point) -> str:
    return point_id(config(tiny_data, params, point), fingerprints(tiny_data.shards, None))


def _train(tiny_data, params, workdir, tokens, arch="early", **kw):
    cfg = config(tiny_data, params, Point(arch, "xxs", tokens, "45-45-10", 0))
    return train_point(cfg, shards=tiny_data.shards, codebook=None, workdir=workdir, **kw)


LOSSES = ("loss_caption", "loss_interleaved", "loss_text", "loss_avg", "train_loss")


def test_schedule_is_a_function_of_n_with_a_1_minus_sqrt_cooldown():
    params = study_params(
        {"train": {"batch_rows_ref": 8, "batch_exponent": 0.25}, "data": {"context_length": 256}}
    )
    small, big = (
        schedule(400_000, 50_000, params, False),
        schedule(400_000, 2_000_000, params, False),
    )
    assert small.lr > big.lr and small.batch_rows <= big.batch_rows
    s = schedule(100 * 8 * 256, 100_000, params, False)
    assert s.cooldown_start == s.steps - round(0.2 * s.steps)
    lrs = [s.lr_at(i) for i in range(s.steps)]
    assert lrs[0] < lrs[s.warmup_steps] == pytest.approx(s.lr)  # warmup, then constant
    assert lrs[s.cooldown_start] == pytest.approx(s.lr) and lrs[-1] < 0.25 * s.lr
    mid = s.cooldown_start + (s.steps - s.cooldown_start) // 4
    frac = (mid - s.cooldown_start) / (s.steps - s.cooldown_start)
    assert lrs[mid] == pytest.approx(s.lr * (1 - frac**0.5))


def test_the_run_config_is_the_one_place_the_recipe_is_worked_out(tiny_data):
    """N, the schedule, the lr law and the branch steps of a point, from params, once."""
    params = tiny_params(tiny_data)
    cfg = config(tiny_data, params, Point("early", "xs", 4096, "45-45-10", 0))
    tp = params.train
    assert cfg.schedule.lr == tp.lr_ref * (cfg.counts.N / tp.n_ref) ** tp.lr_exponent
    assert cfg.batch_tokens == cfg.schedule.batch_rows * params.data.context_length
    assert cfg.schedule.steps == round(4096 / cfg.batch_tokens)
    assert (
        cfg.model.d_model == 48
        and cfg.model.vocab_size == load_info(tiny_data.shards)["vocab_size"]
    )
    budgets = [schedule(t, cfg.counts.N, params, False).cooldown_start for t in params.grid.tokens]
    assert cfg.branch_steps == tuple(sorted(set(budgets)))
    moe = config(tiny_data, params, Point("early-moe", "xs", 4096, "45-45-10", 0))
    assert moe.schedule.warmup_steps > cfg.schedule.warmup_steps  # MoE warms up longer
    assert moe.counts.N > cfg.counts.N  # + the routers


def test_point_id_tracks_what_changes_the_result(tiny_data):
    p = tiny_params(tiny_data)
    pt = Point("early", "xxs", 2048, "45-45-10", 0)
    same = pid_of(tiny_data, tiny_params(tiny_data, threads=2, checkpoint_every_steps=7), pt)
    assert pid_of(tiny_data, p, pt) == same
    assert pid_of(tiny_data, tiny_params(tiny_data, processes=2), pt) == same  # how, not what
    assert pid_of(tiny_data, tiny_params(tiny_data, lr_ref=1e-3), pt) != same
    other = dataclasses.replace(fingerprints(tiny_data.shards, None), data="other-data")
    assert point_id(config(tiny_data, p, pt), other) != same
    assert pid_of(tiny_data, p, Point("early", "xxs", 4096, "45-45-10", 0)) != same


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
    trunk = list((tmp_path / "branched" / "groups").glob("*/branch-*@*.pt"))
    assert len(trunk) == 2  # one checkpoint per budget's cooldown start


@pytest.mark.parametrize("log_every", [1, 4])
def test_a_nan_loss_is_recorded_as_failed(tiny_data, tmp_path, monkeypatch, log_every):
    """The losses are read at log steps (log_every 4: steps 0-3 in one read); the NaN of step 2
    is named, and no checkpoint is written after it."""
    params = tiny_params(tiny_data, log_every_steps=log_every, branch_cooldowns=False)
    pid = pid_of(tiny_data, params, Point("early", "xxs", 2048, "45-45-10", 0))
    monkeypatch.setenv(FAULT_ENV, json.dumps({pid: 2}))  # the test hook: NaN at step 2
    rec = _train(tiny_data, params, tmp_path, 2048)
    assert rec["status"] == "failed" and "non-finite" in rec["error"] and "step 2" in rec["error"]
    saved = json.loads(next((tmp_path / "points").glob("*/record.json")).read_text())
    assert saved["status"] == "failed"
    newest = newest_version(tmp_path / "points" / pid, "latest")
    assert newest.meta()[1] == 2  # the checkpoint before the NaN, not after it
    state = newest.state()
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def newest_version(folder, slot: str):
    """The newest committed version of checkpoint ``slot`` in ``folder``
    (flows/training/checkpoints.py)."""
    return Slot(Store(folder), slot).versions()[0]


def _config_file(tiny_data, params, point: Point, path) -> str:
    path.write_text(config(tiny_data, params, point).to_json())
    return str(path)


def _point_process(tiny_data, params, tmp_path, workdir: str) -> list[str]:
    """The command that trains the 4096-token early point in a process of its own."""
    point = Point("early", "xxs", 4096, "45-45-10", 0)
    return [sys.executable, "-m", "flows.train",
            "--config", _config_file(tiny_data, params, point, tmp_path / "config.json"),
            "--shards", str(tiny_data.shards), "--workdir", str(tmp_path / workdir)]  # fmt: skip


def _kernels() -> dict[str, str]:
    """The environment of every point process a kill test compares: the grid's pinned CPU
    kernels (flows/devices.py), for the uninterrupted run as for the killed one. A reference
    trained in the test's own process would run the kernels that process loaded, pinned or
    not (an earlier test's grid pins os.environ for its children), and on an AVX-512 machine
    the two give other numbers."""
    return dict(os.environ, **cpu_kernel_env())


def _finish(cmd: list[str]) -> tuple[dict, subprocess.CompletedProcess]:
    """Run the point process to its end; its record (the last line it prints) and its output."""
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=_kernels())
    return json.loads(out.stdout.strip().splitlines()[-1]), out


def _kill_once_written(tiny_data, params, tmp_path, pattern: str, count: int = 1):
    """Start the 4096-token early point in its own process and SIGKILL it once ``count`` files
    matching ``pattern`` exist in its workdir; returns the command (to rerun) and the workdir."""
    cmd = _point_process(tiny_data, params, tmp_path, "killed")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_kernels())
    deadline = time.time() + 120
    work = tmp_path / "killed"
    while time.time() < deadline and len(list(work.glob(pattern))) < count:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return cmd, work


@pytest.mark.slow
def test_kill_9_then_rerun_gives_the_same_metrics(tiny_data, tmp_path):
    params = tiny_params(tiny_data, checkpoint_every_steps=1)
    ref, _ = _finish(_point_process(tiny_data, params, tmp_path, "ref"))
    cmd, work = _kill_once_written(tiny_data, params, tmp_path, "groups/*/trunk-latest@*.pt")
    assert not list(work.glob("points/*/record.json"))  # it really died before the end
    rec, _ = _finish(cmd)
    for k in LOSSES:
        assert rec[k] == pytest.approx(ref[k], rel=1e-6, abs=1e-7), k

    def steps(root):
        lines = next(root.glob("points/*/metrics.jsonl")).read_text().splitlines()
        return [json.loads(line)["step"] for line in lines]

    assert steps(work) == steps(tmp_path / "ref")  # resumed curve: no gap, no duplicate


@pytest.mark.slow
def test_a_truncated_checkpoint_is_set_aside_and_the_one_before_resumes(tiny_data, tmp_path):
    """A disk or copy fault truncates the latest checkpoint of a point killed in its cooldown
    ("PytorchStreamReader failed reading zip archive" on every retry, before): it is set aside
    (``.corrupt``, kept), the point resumes from the checkpoint before it and ends with the
    uninterrupted numbers."""
    params = tiny_params(tiny_data, checkpoint_every_steps=1)
    ref, _ = _finish(_point_process(tiny_data, params, tmp_path, "ref"))
    cmd, work = _kill_once_written(tiny_data, params, tmp_path, "points/*/latest@*.pt", count=2)
    assert not list(work.glob("points/*/record.json"))  # it really died before the end
    [pdir] = work.glob("points/*")
    damaged = pdir / newest_version(pdir, "latest").name  # what a resume would read: half of it
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
    rec, out = _finish(cmd)
    for k in LOSSES:
        assert rec[k] == pytest.approx(ref[k], rel=1e-6, abs=1e-7), k
    assert damaged.with_name(damaged.name + ".corrupt").exists()  # set aside, kept
    assert "does not read" in out.stderr and "resuming from the checkpoint before" in out.stderr


def test_a_moe_point_records_which_experts_see_image_and_text_tokens(tiny_data, tmp_path):
    params = tiny_params(tiny_data)
    for arch in ("early-moe", "early-moe-aware"):
        rec = _train(tiny_data, params, tmp_path / arch, 2048, arch=arch)
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


def test_a_point_of_an_expert_sweep_trains_its_own_expert_count(tiny_data, tmp_path, capsys):
    params = tiny_params(tiny_data)
    point = Point("early-moe", "xxs", 2048, "45-45-10", 0, experts=4)
    expect = pid_of(tiny_data, params, point)
    rc = train_main(["--config", _config_file(tiny_data, params, point, tmp_path / "c.json"),
                     "--shards", str(tiny_data.shards), "--codebook", str(tmp_path / "none.pt"),
                     "--workdir", str(tmp_path), "--point-id", expect])  # fmt: skip
    rec = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0 and rec["point_id"] == expect and rec["status"] == "ok"
    routing = json.loads((tmp_path / "points" / expect / "routing.json").read_text())
    assert all(len(layer["image"]) == 4 for layer in routing["layers"])
    assert params.model.n_experts == 8  # the file's count, overridden by the point


def _tamper(src, dst, fingerprint) -> None:
    """A checkpoint with zeroed weights, claiming it was written by ``fingerprint``."""
    state = torch.load(src, weights_only=True)
    state["model"] = {k: torch.zeros_like(v) for k, v in state["model"].items()}
    state["code"] = {"fingerprint": fingerprint, "git_revision": "elsewhere"}
    torch.save(state, dst)


def test_checkpoints_written_by_other_code_are_never_resumed_or_branched_from(
    tiny_data, tmp_path, caplog
):
    ref = _train(tiny_data, tiny_params(tiny_data, branch_cooldowns=False), tmp_path / "ref", 4096)
    params, work = tiny_params(tiny_data), tmp_path / "work"
    _train(tiny_data, params, work, 2048)  # trains the group's trunk up to 2048's cooldown
    [gdir] = (work / "groups").iterdir()
    trunk = newest_version(gdir, "trunk-latest")
    latest = gdir / trunk.name
    _tamper(latest, latest, "other-code")  # the trunk 4096 would resume from
    pid = pid_of(tiny_data, params, Point("early", "xxs", 4096, "45-45-10", 0))
    (work / "points" / pid).mkdir(parents=True)
    own = work / "points" / pid / Slot(None, "latest").version_name(trunk.step, sharded=False)
    _tamper(latest, own, "other-code")  # and its own checkpoint
    rec = _train(tiny_data, params, work, 4096)
    for k in LOSSES:
        assert rec[k] == pytest.approx(ref[k], rel=1e-6, abs=1e-7), k
    assert caplog.text.count("written by other code") == 2
    mine = newest_version(gdir, "trunk-latest").meta()[0]
    assert mine == rec["code_fingerprint"] != "other-code"  # the trunk was trained again
    assert rec["git_revision"] and rec["code_fingerprint"] == fingerprints(
        tiny_data.shards, None
    ).code("early")


def test_the_evaluation_splits_the_loss_by_role_rank_and_blanked_images(tiny_data, tmp_path):
    rec = _train(tiny_data, tiny_params(tiny_data), tmp_path, 2048)
    assert set(TARGETS) <= {k.removeprefix("loss_") for k in rec if k.startswith("loss_")}
    for kind in ("caption", "interleaved", "text"):
        for role in ("template", "name", "attribute", "value"):
            assert rec[f"eval_{kind}_{role}"] > 0, (kind, role)
    assert "eval_caption_noimage" in rec and "eval_text_noimage" not in rec  # no images there
    ranks = sorted(k for k in rec if k.startswith("eval_value_rank1e"))
    assert ranks[0] == "eval_value_rank1e0" and len(ranks) >= 3  # rank 1, 2-10, 11-100, ...
    assert not any(k.startswith("loss_") and "rank" in k for k in rec)  # not fit targets


def test_cosine_schedule_and_a_longer_moe_warmup():
    params = study_params(
        {"train": {"schedule": "cosine", "branch_cooldowns": False, "moe_warmup_mult": 2.5},
         "data": {"context_length": 256}}
    )  # fmt: skip
    s = schedule(200 * 512, 100_000, params, False)
    lrs = [s.lr_at(i) for i in range(s.steps)]
    assert lrs[s.warmup_steps] == pytest.approx(s.lr)
    mid = s.warmup_steps + (s.steps - s.warmup_steps) // 2
    assert lrs[mid] == pytest.approx(0.5 * s.lr, rel=0.02) and lrs[-1] < 0.01 * s.lr
    moe = schedule(200 * 512, 100_000, params, True)
    assert moe.warmup_steps == pytest.approx(2.5 * s.warmup_steps, abs=1)
    from stages.params import ParamsError

    with pytest.raises(ParamsError, match="cosine.*branch_cooldowns"):
        study_params({"train": {"schedule": "cosine", "branch_cooldowns": True}})


def test_metrics_are_logged_every_k_steps_as_means(tiny_data, tmp_path):
    params = tiny_params(tiny_data, log_every_steps=4, branch_cooldowns=False)
    rec = _train(tiny_data, params, tmp_path, 2048)
    rows = [
        json.loads(x)
        for x in next(tmp_path.glob("points/*/metrics.jsonl")).read_text().splitlines()
    ]
    steps = [r["step"] for r in rows if "train_loss" in r]
    assert steps == [s for s in range(1, rec["steps"] + 1) if s % 4 == 0 or s == rec["steps"]]
