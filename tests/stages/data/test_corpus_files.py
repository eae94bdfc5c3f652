"""Real data through the whole data half: corpus (files listed) -> tokenizer -> shards (read\nonce, checked and counted on the way) -> loader."""

import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from stages.data.corpus_format import CorpusWriter, write_json
from stages.data.ingest import check_corpus
from stages.data.kinds import KINDS
from stages.data.loader import PackedLoader
from stages.data.shard_format import load_info, read_shard
from stages.data.shards import build_shards
from stages.params import load_params
from tests.conftest import write_study
from tests.stages.data.test_ingest import img, read_corpus, write_tar


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


def _stage(module, cwd, *args):
    cmd = [sys.executable, "-m", module, *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)


def test_ingested_data_goes_through_shards_and_loader(tmp_path):
    """One read of the inputs: the corpus stage lists them, the shards stage checks, counts and
    shards in one pass (2 workers), and its counts are what a check pass in one process gives."""
    _fixtures(tmp_path, n_bad_captions=2)
    for module in ("stages.corpus", "stages.tokenizer", "stages.shards"):
        r = _stage(module, tmp_path)
        assert r.returncode == 0, r.stderr[-2000:]
    corpus = tmp_path / "data/corpus"
    assert sorted(p.name for p in corpus.iterdir()) == ["report.json"]  # nothing copied
    report = json.loads((tmp_path / "data/shards/report.json").read_text())
    assert report["kinds"]["caption"]["bad"] == {"undecodable_image": 2}
    assert report["kinds"]["caption"]["kept"] == 12
    assert report == check_corpus(corpus, workers=1)
    info = load_info(tmp_path / "data/shards")
    assert info["totals"]["train/caption"]["floor_nats_per_token"] is None  # unknown for real data
    assert info["totals"]["train/caption"]["images"] >= 10
    mix = {"caption": 0.5, "interleaved": 0.3, "text": 0.2}
    b = PackedLoader(tmp_path / "data/shards", 4, 32, mix).next_batch()
    assert b.images.shape[1:] == (3, 16, 16) and b.loss_mask.sum() > 0


def test_too_many_bad_samples_fail_the_stage_and_keep_the_report(tmp_path):
    """The shards stage counts as it reads: a kind above max_bad_fraction fails it, named with
    its reasons, its report kept; the corpus stage's --check says the same before any sharding."""
    _fixtures(tmp_path, n_bad_captions=6)  # 6 / 18 > 0.2
    checked = _stage("stages.corpus", tmp_path, "--check")
    assert checked.returncode == 1
    assert "caption: bad fraction 0.3333" in checked.stderr
    assert not (tmp_path / "data/shards").exists()
    assert _stage("stages.tokenizer", tmp_path).returncode == 0
    r = _stage("stages.shards", tmp_path)
    assert r.returncode == 1
    assert "caption: bad fraction 0.3333" in r.stderr and "undecodable_image=6" in r.stderr
    report = json.loads((tmp_path / "data/shards/report.json").read_text())
    assert report["kinds"]["caption"]["bad"] == {"undecodable_image": 6}
    assert report["breaches"] and report["kinds"]["text"]["bad"] == {}
    assert not (tmp_path / "data/shards/manifest.parquet").exists()  # no reader takes them

    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    params["corpus"]["files"]["text"] = [str(tmp_path / "nowhere" / "*.jsonl")]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    r = _stage("stages.corpus", tmp_path)
    assert r.returncode == 1 and "matches no files" in r.stderr and "Traceback" not in r.stderr


def _samples(shards):
    manifest = pq.read_table(shards / "manifest.parquet").to_pylist()
    return {split: [(s.key, s.ids.tolist(), s.images.tolist()) for r in manifest
                    if r["split"] == split for s in read_shard(shards / r["path"], 16)]
            for split in ("train", "val")}  # fmt: skip


def test_shards_read_where_the_data_lies_hold_what_a_copy_gives(tmp_path):
    """The inputs read through the checks by the shards stage give the same samples (keys,
    tokens, decoded pixels, in order) as the same documents copied into a canonical corpus."""
    _fixtures(tmp_path, n_bad_captions=2)
    for module in ("stages.corpus", "stages.tokenizer", "stages.shards"):
        assert _stage(module, tmp_path).returncode == 0
    copy = tmp_path / "copy"
    for kind in KINDS:
        with CorpusWriter(copy, kind, samples_per_file=5) as w:
            for doc in read_corpus(tmp_path / "data/corpus", kind):
                w.write(doc)
    write_json(copy / "report.json", {"source": "copy"})
    params = load_params(tmp_path / "params.yaml")
    tok = tmp_path / "data/tokenizer/tokenizer.json"
    build_shards(copy, tok, tmp_path / "copy-shards", params.shards, workers=1)
    here, there = _samples(tmp_path / "data/shards"), _samples(tmp_path / "copy-shards")
    assert len(here["train"]) == 12 + 4 + 10 - len(here["val"])
    assert here == there
