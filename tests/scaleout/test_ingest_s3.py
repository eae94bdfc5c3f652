"""Real data read where it lies: the ingest of all three kinds (and a DCLM-style .jsonl.zst)
from the test S3 (moto's server on loopback; credentials and endpoint from the environment only)
counts every bad sample by reason and keeps the same documents, byte for byte, in 2 worker
processes (a task per file) as in one process from a local folder."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from stages.data.corpus_format import iter_docs
from stages.data.ingest import IngestError, expand, ingest
from tests.stages.data.test_ingest import EXPECTED_BAD, build

pytestmark = [pytest.mark.scaleout]


def upload(s3, bucket: str, root: Path) -> None:
    client = s3.client()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            client.upload_file(str(p), bucket, p.relative_to(root).as_posix())


def test_the_ingest_reads_s3_globs_and_counts_as_from_a_folder(s3, monkeypatch, tmp_path):
    for k, v in s3.env.items():
        monkeypatch.setenv(k, v)
    src = tmp_path / "src"
    src.mkdir()
    params, kept = build(src)
    with pa.CompressedOutputStream(str(src / "texts" / "d.jsonl.zst"), "zstd") as f:  # DCLM's
        f.write(b'{"text": "zst one"}\n{"txt": "no text field"}\n{"text": "zst two"}\n')
    params = params.model_copy(update={"text": [*params.text, str(src / "texts" / "*.zst")]})
    kept["text"] += [("1", ["zst one"], [None]), ("3", ["zst two"], [None])]
    expected = {**EXPECTED_BAD, "text": {**EXPECTED_BAD["text"], "malformed_record": 6}}
    bucket = s3.bucket("nmm-ingest")
    upload(s3, bucket, src)
    urls = {kind: [p.replace(str(src), f"s3://{bucket}") for p in getattr(params, kind)]
            for kind in ("caption", "interleaved", "text")}  # fmt: skip
    assert urls["text"][2] == f"s3://{bucket}/texts/**/*.parquet"  # a recursive glob, too
    remote = params.model_copy(update=urls)

    local = ingest(params, tmp_path / "local", samples_per_file=2, workers=1)  # one process
    report = ingest(remote, tmp_path / "remote", samples_per_file=2, workers=2)  # 2 at a time
    for kind, k in report["kinds"].items():
        assert k["bad"] == expected[kind] == local["kinds"][kind]["bad"], kind
        assert (k["read"], k["kept"]) == (local["kinds"][kind]["read"], len(kept[kind])), kind
        assert k["files"] == [f.replace(str(src), f"s3://{bucket}")
                              for f in local["kinds"][kind]["files"]]  # fmt: skip
        here = list(iter_docs(tmp_path / "local", kind))
        there = list(iter_docs(tmp_path / "remote", kind))
        assert [(d.key, d.texts, d.images) for d in there] == [
            (d.key, d.texts, d.images) for d in here
        ]
        assert all(d.meta["source"].startswith(f"s3://{bucket}/") for d in there)
        assert [d.texts for d in there] == [t for _, t, _ in kept[kind]]

    with pytest.raises(IngestError, match=r"corpus.files.caption: pattern 's3://.*tgz' matches no"):
        expand([f"s3://{bucket}/caps/*.tgz"], "caption")
    with pytest.raises(IngestError, match=r"corpus.files.text\[1\]: 'nope://x/a.jsonl'"):
        expand([f"s3://{bucket}/texts/a.jsonl", "nope://x/a.jsonl"], "text")
