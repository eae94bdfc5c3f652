"""Real data read where it lies: the check of all three kinds (and a DCLM-style .jsonl.zst)
from the test S3 (moto's server on loopback; credentials and endpoint from the environment only)
counts every bad sample by reason in 2 worker processes (a task per file) as in one process
from a local folder, and the corpus's readers read the same documents, byte for byte, from S3
(nothing copied)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import sklearn
import yaml
from PIL import Image

from flows import records
from stages.data.corpus_format import write_json
from stages.data.ingest import IngestError, check_corpus, expand, list_inputs
from stages.data.shard_format import read_manifest
from tests.flows.conftest import grid_params
from tests.scaleout.test_shards_s3 import _grid
from tests.stages.data.test_ingest import EXPECTED_BAD, build, corpus_stage, read_corpus

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

    local = corpus_stage(params, tmp_path / "local", workers=1)  # one process
    report = corpus_stage(remote, tmp_path / "remote", workers=2)  # 2 at a time
    for kind, k in report["kinds"].items():
        assert k["bad"] == expected[kind] == local["kinds"][kind]["bad"], kind
        assert (k["read"], k["kept"]) == (local["kinds"][kind]["read"], len(kept[kind])), kind
        assert [r["path"] for r in k["parts"]] == [
            r["path"].replace(str(src), f"s3://{bucket}") for r in local["kinds"][kind]["parts"]
        ]
        listed = json.loads((tmp_path / "remote/report.json").read_text())["kinds"][kind]
        assert all(r["version"] and r["size"] for r in listed["inputs"])  # ETags, from the listing
        here = read_corpus(tmp_path / "local", kind)
        there = read_corpus(tmp_path / "remote", kind)
        assert [(d.key, d.texts, d.images) for d in there] == [
            (d.key, d.texts, d.images) for d in here
        ]
        assert all(d.meta["source"].startswith(f"s3://{bucket}/") for d in there)
        assert [d.texts for d in there] == [t for _, t, _ in kept[kind]]

    with pytest.raises(IngestError, match=r"corpus.files.caption: pattern 's3://.*tgz' matches no"):
        expand([f"s3://{bucket}/caps/*.tgz"], "caption")
    with pytest.raises(IngestError, match=r"corpus.files.text\[1\]: 'nope://x/a.jsonl'"):
        expand([f"s3://{bucket}/texts/a.jsonl", "nope://x/a.jsonl"], "text")


def _photo_tar(path: Path, n: int) -> None:
    """``n`` captions of real photographs (crops of the JPEGs scikit-learn ships, 64-160 px,
    re-encoded as JPEG), as an img2dataset tar."""
    photos = [np.asarray(Image.open(Path(sklearn.__file__).parent / "datasets/images" / name))
              for name in ("china.jpg", "flower.jpg")]  # fmt: skip
    rng = np.random.default_rng(0)
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            src = photos[i % 2]
            h, w = (int(rng.integers(64, 161)) for _ in range(2))
            y, x = int(rng.integers(0, src.shape[0] - h)), int(rng.integers(0, src.shape[1] - w))
            buf = io.BytesIO()
            Image.fromarray(src[y : y + h, x : x + w]).save(buf, format="JPEG", quality=90)
            for ext, data in (("jpg", buf.getvalue()), ("txt", f"photo number {i}".encode())):
                info = tarfile.TarInfo(f"p{i:03d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


@pytest.mark.slow
def test_the_stages_read_s3_shard_to_s3_and_a_grid_trains_there(s3, monkeypatch, tmp_path):
    """The chain as a team with its data in object storage runs it: real JPEG captions (and
    planted bad samples), OBELICS-style parquet and DCLM-style jsonl.zst in the test S3; the
    corpus, tokenizer and shards stages (as `dvc repro` runs them) read them there, once, and
    write the shards to S3 (2 workers), with the bad counts by reason of a one-process check of
    the same files in a folder; a 2-point grid trains from the S3 shards."""
    for k, v in s3.env.items():
        monkeypatch.setenv(k, v)
    src = tmp_path / "src"
    src.mkdir()
    params, _ = build(src)
    _photo_tar(src / "caps" / "photos.tar", 24)
    with pa.CompressedOutputStream(str(src / "texts" / "d.jsonl.zst"), "zstd") as f:
        f.write(b'{"text": "zst one"}\n{"txt": "no text field"}\n{"text": "zst two"}\n')
    params = params.model_copy(
        update={"text": [*params.text, str(src / "texts" / "*.zst")], "max_image_side": 1024}
    )
    bucket = s3.bucket("nmm-chain")
    upload(s3, bucket, src)
    files = {kind: [p.replace(str(src), f"s3://{bucket}") for p in getattr(params, kind)]
             for kind in ("caption", "interleaved", "text")}  # fmt: skip
    work = tmp_path / "study"
    work.mkdir()
    raw = grid_params(
        corpus={"source": "files", "files": {**params.model_dump(), **files}},
        shards={"url": f"s3://{bucket}/shards"},
        grid={"archs": ["early"]},
    )
    (work / "params.yaml").write_text(yaml.safe_dump(raw))
    for stage in (["stages.corpus"], ["stages.tokenizer"], ["stages.shards", "--workers", "2"]):
        r = subprocess.run([sys.executable, "-m", *stage], cwd=work, capture_output=True,
                           text=True, timeout=300)  # fmt: skip
        assert r.returncode == 0, r.stderr[-3000:]

    local = tmp_path / "local-corpus"
    local.mkdir()
    write_json(local / "report.json", list_inputs(params))
    one = check_corpus(local, workers=1)
    report = json.loads((work / "data/shards/report.json").read_text())
    for kind in ("caption", "interleaved", "text"):
        got, want = report["kinds"][kind], one["kinds"][kind]
        assert (got["read"], got["kept"], got["bad"]) == (want["read"], want["kept"], want["bad"])
    assert report["kinds"]["caption"]["kept"] >= 24 and report["kinds"]["caption"]["bad"]
    manifest = read_manifest(work / "data/shards")
    assert manifest and all(r["path"].startswith(f"s3://{bucket}/shards/") for r in manifest)
    assert not (work / "data/shards/train").exists()  # the shards lie in S3 only

    results = tmp_path / "results"
    _grid(work / "params.yaml", str(work / "data/shards"), results,
          {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect")})  # fmt: skip
    table = records.read_table(results / "runs.parquet")
    assert len(table) == 2 and all(r["status"] == "ok" for r in table)
    assert all(0 < r["loss_avg"] < 20 for r in table)
