"""Checkpoints in object storage (flows/training/checkpoints.py) on the test S3 (moto's server
on loopback; the point processes get the credentials and endpoint from the environment only):
versions, commits and truncation as on a local disk, and a point killed mid-way under FSDP over
2 processes, writing DCP shards asynchronously to S3, resumes in one process (and one killed in
one process, writing whole files to S3, resumes over 2) with the uninterrupted losses."""

from __future__ import annotations

import pytest

from flows.training.checkpoints import Store
from tests.flows.training.test_checkpoints import check_versions
from tests.flows.training.test_distributed import ENV, resumes_at_another_count

pytestmark = [pytest.mark.scaleout]


@pytest.fixture
def s3_env(s3, monkeypatch):
    for k, v in s3.env.items():
        monkeypatch.setenv(k, v)
    return dict(ENV, **s3.env)


@pytest.mark.parametrize("sharded", [False, True], ids=["full", "sharded"])
def test_versions_commits_and_truncation_on_s3(s3, s3_env, sharded):
    bucket = s3.bucket(f"nmm-versions-{'sharded' if sharded else 'full'}")
    check_versions(Store(f"s3://{bucket}/groups/g"), sharded)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("before", "after", "how"),
    [(2, 1, {"checkpoint_format": "sharded", "checkpoint_async": True}), (1, 2, {})],
    ids=["sharded-async-2-to-1", "full-1-to-2"],
)
def test_a_checkpoint_on_s3_resumes_at_another_process_count(
    s3, s3_env, tiny_data, tmp_path, uninterrupted, before, after, how
):
    bucket = s3.bucket(f"nmm-ckpt-{before}-{after}")
    store = f"s3://{bucket}/study"
    resumes_at_another_count(
        tiny_data, tmp_path, uninterrupted, before, after, store, s3_env, **how
    )
    objects = Store(store).fs.find(f"{bucket}/study")
    assert objects == [] or all("/groups/" in o for o in objects)  # a finished point's: gone
