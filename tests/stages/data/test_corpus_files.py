"""Real data through the whole data half: corpus (files) -> tokenizer -> shards -> loader."""

import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq

from stages.data.loader import PackedLoader
from stages.data.shard_format import load_info
from tests.conftest import write_study
from tests.stages.data.test_ingest import img, write_tar


def _fixtures(tmp, n_bad_captions: int):
    members = []
    for i in range(12):
        members += [(f"s{i}.jpg", img("JPEG", 40 + i, 30, i)), (f"s{i}.txt", f"photo {i}".encode())]
    for i in range(n_bad_captions):
        members += [(f"bad{i}.jpg", b"not a jpeg" * 20), (f"bad{i}.txt", b"broken")]
    write_tar(tmp / "caps.tar", members)
    rows = {
        "texts": [["a story", None, "the end"]] * 4,
        "images": [[None, img("PNG", 24, 24, 7), None]] * 4,
    }
    pq.write_table(pa.table(rows), tmp / "docs.parquet")
    (tmp / "text.jsonl").write_text(
        "".join(json.dumps({"text": f"words {i} " * 5}) + "\n" for i in range(10))
    )
    params = {
        "corpus": {
            "source": "files",
            "files": {
                "caption": [str(tmp / "*.tar")],
                "interleaved": [str(tmp / "docs.parquet")],
                "text": [str(tmp / "text.jsonl")],
                "max_bad_fraction": 0.2,
            },
        },
        "tokenizer": {"vocab_size": 300, "min_frequency": 1},
        "shards": {"image_size": 16, "patch_size": 8, "val_fraction": 0.01},
        "data": {"context_length": 32},
    }
    write_study(tmp / "params.yaml", params)


def _stage(module, cwd):
    return subprocess.run([sys.executable, "-m", module], cwd=cwd, capture_output=True, text=True)


def test_ingested_data_goes_through_shards_and_loader(tmp_path):
    _fixtures(tmp_path, n_bad_captions=2)
    for module in ("stages.corpus", "stages.tokenizer", "stages.shards"):
        r = _stage(module, tmp_path)
        assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads((tmp_path / "data/corpus/report.json").read_text())
    assert report["kinds"]["caption"]["bad"] == {"undecodable_image": 2}
    assert report["kinds"]["caption"]["kept"] == 12
    info = load_info(tmp_path / "data/shards")
    assert info["totals"]["train/caption"]["floor_nats_per_token"] is None  # unknown for real data
    assert info["totals"]["train/caption"]["images"] >= 10
    mix = {"caption": 0.5, "interleaved": 0.3, "text": 0.2}
    b = PackedLoader(tmp_path / "data/shards", 4, 32, mix).next_batch()
    assert b.images.shape[1:] == (3, 16, 16) and b.loss_mask.sum() > 0


def test_too_many_bad_samples_fail_the_stage_and_keep_the_report(tmp_path):
    _fixtures(tmp_path, n_bad_captions=6)  # 6 / 18 > 0.2
    r = _stage("stages.corpus", tmp_path)
    assert r.returncode == 1
    assert "caption" in r.stderr and "undecodable_image" in r.stderr
    report = json.loads((tmp_path / "data/corpus/report.json").read_text())
    assert report["kinds"]["caption"]["bad"] == {"undecodable_image": 6}
