"""The shards stage on a Ray cluster of two nodes on loopback (``data.engine: ray``): the worker
node is killed (-9, raylet and workers) while it runs a task; the stage completes, its lost task
run again on the head, with shards and a manifest byte-identical to the local engine's. Real
inputs (JPEG captions, parquet documents, jsonl text, read where they lie, bad samples among
them) give on the cluster the shards, manifest and bad-sample counts of one local process,
though the stage runs elsewhere than the nodes were started: a task runs in the stage's
directory."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from stages.common.engine import WorkdirMissing, _in_dir
from stages.common.paths import ROOT
from tests.conftest import TINY_PARAMS, build_data, write_study
from tests.stages.data.test_corpus_files import _fixtures, _stage

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


def test_real_inputs_shard_on_the_cluster_as_in_one_process(ray_cluster, tmp_path):
    """The corpus stage lists real files (12 JPEG captions and 2 undecodable ones in a tar, a
    parquet of interleaved documents, a jsonl of text); the shards stage reads them where they
    lie, a task per file on either node, and writes what one local process writes: every shard
    and the manifest byte for byte, and the same report (samples read, kept, bad by reason)."""
    _fixtures(tmp_path, n_bad_captions=2)
    for module in ("stages.corpus", "stages.tokenizer"):
        assert _stage(module, tmp_path).returncode == 0
    local = _stage("stages.shards", tmp_path, "--workers", "1", "--out", "local-shards")
    assert local.returncode == 0, local.stderr[-3000:]
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    params["data"] |= {"engine": "ray", "address": ray_cluster.address}
    (tmp_path / "ray.yaml").write_text(yaml.safe_dump(params))
    r = _stage("stages.shards", tmp_path, "--params", "ray.yaml", "--out", "ray-shards")
    assert r.returncode == 0, r.stderr[-3000:]
    got, want = files(tmp_path / "ray-shards"), files(tmp_path / "local-shards")
    assert sorted(got) == sorted(want)
    assert all(got[k] == want[k] for k in want)  # report.json among them
    report = json.loads(got["report.json"])
    assert report["kinds"]["caption"]["kept"] == 12
    assert report["kinds"]["caption"]["bad"] == {"undecodable_image": 2}


def test_a_task_runs_in_the_stages_directory_and_fails_where_a_node_lacks_it(tmp_path, monkeypatch):
    """The Ray tasks' wrapper: the stage's working directory, or an error naming it that is
    not an OSError (those are retried as storage hiccups)."""
    monkeypatch.chdir(ROOT)  # (restored after the test)
    here = tmp_path / "stage"
    here.mkdir()
    assert _in_dir(str(here), lambda name: Path(name).resolve(), "x") == here / "x"
    with pytest.raises(WorkdirMissing, match=f"no directory {tmp_path / 'gone'}, where the"):
        _in_dir(str(tmp_path / "gone"), print)
    assert not issubclass(WorkdirMissing, OSError)
