"""A DVC remote on S3-compatible storage: what one machine computed, another restores.

One checkout runs the data stages and pushes their outputs and DVC's run cache to a remote on
the test S3; a fresh clone of its git history (the remote's address in .dvc/config, the
credentials only in the environment) pulls them, and `dvc repro` then has nothing to run."""

from __future__ import annotations

import pytest

from stages.params import merge, read_yaml
from tests.conftest import TINY_PARAMS
from tests.test_dvc_repro import ROOT, fresh_checkout, run

DATA_STAGES = ("corpus", "tokenizer", "shards", "codebook")


@pytest.mark.scaleout
@pytest.mark.slow
def test_push_on_one_machine_pull_on_another_and_nothing_to_run(s3, tmp_path):
    bucket = s3.bucket("nmm-dvc")
    params = merge(read_yaml(ROOT / "params.yaml"), TINY_PARAMS)
    first, env, dvc = fresh_checkout(tmp_path / "a", params)
    env |= s3.env  # credentials: the environment, never the repository
    run([*dvc, "remote", "add", "-d", "store", f"s3://{bucket}/dvc"], first, env)
    run([*dvc, "remote", "modify", "store", "endpointurl", s3.endpoint], first, env)
    out = run([*dvc, "repro", "codebook"], first, env)
    assert all(f"Running stage '{s}'" in out for s in DATA_STAGES)
    run(["git", "add", "-A"], first, env)
    run(["git", "commit", "-qm", "data stages"], first, env)
    run([*dvc, "push", "--run-cache"], first, env)
    pushed = s3.client().list_objects_v2(Bucket=bucket, Prefix="dvc/")["KeyCount"]
    assert pushed > 10  # the shards, the codebook, the corpus, the run cache

    second = tmp_path / "b"
    run(["git", "clone", "-q", str(first), str(second)], tmp_path, env)
    assert "endpointurl" in (second / ".dvc" / "config").read_text()
    assert not (second / "data" / "shards").exists()
    run([*dvc, "pull", "--run-cache", "--with-deps", "codebook"], second, env)
    manifest = "data/shards/manifest.parquet"
    assert (second / manifest).read_bytes() == (first / manifest).read_bytes()
    again = run([*dvc, "repro", "codebook"], second, env)
    assert "Running stage" not in again and "up to date" in again
