"""Shards in object storage (the test S3: moto's server on loopback; credentials and endpoint
from the environment only): the shards stage writes them there (``shards.url``) byte for byte
as to a folder, keeping the manifest and info locally; the loader reads them, with reader
processes ahead of use, and gives the batches it gives from a folder; a grid trains from them
to the same losses."""

from __future__ import annotations

import os
import subprocess
import sys
from itertools import islice
from pathlib import Path

import pytest
import torch
import yaml

from flows import records
from flows.devices import cpu_kernel_env
from flows.plan import fingerprints, plan
from stages.common.paths import ROOT
from stages.data.kinds import KINDS
from stages.data.loader import PackedLoader, val_batches
from stages.data.shard_format import read_bytes, read_manifest
from stages.data.shards import build_shards
from stages.params import validate_params
from tests.flows.conftest import grid_params

pytestmark = [pytest.mark.scaleout]
MIX = {"caption": 0.45, "interleaved": 0.45, "text": 0.10}


def same(a, b) -> None:
    for name in vars(a):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def to_s3(s3, tiny_data, bucket: str, out: Path) -> str:
    """The tiny data's shards written by the shards stage to ``s3://bucket/shards`` (2 tasks at
    a time), the manifest and info to ``out``; the URL."""
    url = f"s3://{s3.bucket(bucket)}/shards"
    p = tiny_data.params.shards.model_copy(update={"url": url})
    build_shards(tiny_data.corpus, tiny_data.tokenizer, out, p, workers=2)
    return url


def test_the_shards_stage_writes_to_s3_and_the_loader_reads_there(s3, tiny_data, monkeypatch,
                                                                   tmp_path):  # fmt: skip
    for k, v in s3.env.items():
        monkeypatch.setenv(k, v)
    url = to_s3(s3, tiny_data, "nmm-loader", tmp_path / "shards")
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == [
        "info.json",
        "manifest.parquet",
        "report.json",
    ]
    local, remote = (read_manifest(d) for d in (tiny_data.shards, tmp_path / "shards"))
    assert [r["path"] for r in remote] == [f"{url}/{r['path']}" for r in local]
    drop = lambda rows: [{k: v for k, v in r.items() if k != "path"} for r in rows]  # noqa: E731
    assert drop(remote) == drop(local)  # every shard's bytes (sha256), samples and tokens
    for r in local:
        assert read_bytes(f"{url}/{r['path']}") == (tiny_data.shards / r["path"]).read_bytes()
    assert read_manifest(url) == remote  # a copy beside the shards: the URL alone reads too
    local = PackedLoader(tiny_data.shards, 8, 64, MIX)
    remote = PackedLoader(tmp_path / "shards", 8, 64, MIX, workers=2, prefetch=2)
    try:
        for _ in range(45):  # an epoch of captions wraps
            same(remote.next_batch(), local.next_batch())
        assert remote.wait_s > 0
    finally:
        remote.close()
    for kind in KINDS:
        for a, b in zip(val_batches(url, kind, 8, 64), val_batches(tiny_data.shards, kind, 8, 64),
                        strict=True):  # fmt: skip
            same(a, b)
    with pytest.raises(FileNotFoundError):
        next(islice(PackedLoader(f"{url}-missing", 8, 64, MIX), 1))


def _grid(params: Path, shards: str, results: Path, env: dict) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "flows.grid", "run", "--params", str(params), "--shards", shards,
         "--codebook", str(results.parent / "none.pt"), "--results", str(results),
         "--tracking-uri", f"sqlite:///{results.parent / 'mlflow.db'}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]


@pytest.mark.slow
def test_a_grid_trains_from_s3_shards_to_the_local_numbers(s3, tiny_data, tmp_path, monkeypatch):
    """The grid (a reader process per point) from the S3 shards; the same 2 points trained one
    after the other by ``flows.train`` from the folder: equal losses."""
    for k, v in s3.env.items():
        monkeypatch.setenv(k, v)
    to_s3(s3, tiny_data, "nmm-grid", tmp_path / "manifest")
    raw = grid_params(grid={"archs": ["early"]}, train={"loader_workers": 1})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    _grid(tmp_path / "params.yaml", str(tmp_path / "manifest"), tmp_path / "results",
          {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect")})  # fmt: skip
    table = records.read_table(tmp_path / "results" / "runs.parquet")
    got = {(r["arch"], r["tokens_budget"]): r for r in table}
    jobs = sorted(plan(validate_params(raw), fingerprints(tiny_data.shards, None)),
                  key=lambda j: j.point.tokens)  # the chain's order: the trunk first  # fmt: skip
    assert len(got) == len(jobs) == 2
    local = tmp_path / "local"
    local.mkdir()
    for job in jobs:
        (local / "config.json").write_text(job.config.with_(loader_workers=0).to_json())
        out = subprocess.run(
            [sys.executable, "-m", "flows.train", "--config", str(local / "config.json"),
             "--shards", str(tiny_data.shards), "--codebook", str(local / "none.pt"),
             "--workdir", str(local)],
            # the grid's pinned CPU kernels (flows/devices.py): without them this process runs
            # the machine's own, which on an AVX-512 machine give other numbers
            cwd=ROOT, capture_output=True, text=True, timeout=300,
            env=dict(os.environ, **cpu_kernel_env()),
        )  # fmt: skip
        assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
        want = records.read_record(local, job.point_id)
        row = got[(job.point.arch, job.point.tokens)]
        # another manifest (the shards' URLs), so another id: the same numbers
        assert row["status"] == "ok" and row["point_id"] != job.point_id
        assert row["data_wait_s"] >= 0
        for k in ("loss_avg", "loss_caption", "loss_interleaved", "loss_text", "train_loss"):
            assert row[k] == want[k], k
