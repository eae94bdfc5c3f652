"""The shards stage on a Ray cluster of two nodes on loopback (``data.engine: ray``): the worker
node is killed (-9, raylet and workers) while it runs a task; the stage completes, its lost task
run again on the head, with shards and a manifest byte-identical to the local engine's."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from stages.common.paths import ROOT
from tests.conftest import TINY_PARAMS, build_data, write_study

pytestmark = [pytest.mark.scaleout, pytest.mark.slow]
# 9 corpus files (5 caption, 2 interleaved, 2 text), a task each of ~1 s: the kill lands mid-task
RAW = {**TINY_PARAMS,
       "corpus": {"samples_per_file": 500,
                  "synthetic": {"n_caption": 2500, "n_interleaved": 1000, "n_text": 1000}},
       "shards": {**TINY_PARAMS["shards"], "samples_per_shard": 200}}  # fmt: skip


def files(root) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_a_worker_node_killed_mid_stage_loses_nothing(ray_cluster, tmp_path):
    local = build_data(tmp_path / "local", RAW, workers=1)  # the local engine, in this process
    params = write_study(tmp_path / "params.yaml", RAW,
                         {"data": {"engine": "ray", "address": ray_cluster.address}})  # fmt: skip
    out = tmp_path / "ray-shards"
    stage = subprocess.Popen(
        [sys.executable, "-m", "stages.shards", "--params", str(params), "--corpus",
         str(local.corpus), "--tokenizer", str(local.tokenizer), "--out", str(out)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while not ray_cluster.worker_tasks("shard_file"):
            assert stage.poll() is None, "the stage ended before the worker node ran a task"
            assert time.monotonic() < deadline, "the worker node ran no task in 180 s"
            time.sleep(0.05)
        ray_cluster.kill_worker()  # mid-task: the node, its raylet and workers, gone
        log, _ = stage.communicate(timeout=300)
    finally:
        if stage.poll() is None:
            stage.kill()
    assert stage.returncode == 0, log[-3000:]
    got, want = files(out), files(local.shards)
    assert sorted(got) == sorted(want)  # no part-written file left, none missing
    assert all(got[k] == want[k] for k in want)  # the manifest and every shard, byte for byte
