"""stages/data/ingest.py: every reason counted exactly, the kept docs read back byte for byte
from the inputs where they lie (nothing copied), an input changed since it was listed refused."""

from __future__ import annotations

import gzip
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from stages.common.inputs import StaleInput
from stages.data.corpus_format import write_json
from stages.data.ingest import (
    REASONS,
    IngestError,
    check_corpus,
    corpus_parts,
    list_inputs,
    part_docs,
)
from stages.params import FilesCorpus, study_params

MAX_SIDE, MIN_SIDE = 48, 8


def img(fmt: str, w: int, h: int, seed: int = 0) -> bytes:
    """Noisy pixels, so that half the file is not a complete image."""
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt)
    return buf.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def data_offset(tar_bytes: bytes, name: str) -> int:
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tf:
        return tf.getmember(name).offset_data


def corpus_stage(params: FilesCorpus, out: Path, workers: int | None = None) -> dict:
    """What the corpus stage does with real data (the inputs listed in ``out/report.json``,
    nothing else), then a check pass over them: the samples report, counted as the shards stage
    counts in its own pass (tests/stages/data/test_corpus_files.py checks that they agree)."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "report.json", list_inputs(params))
    return check_corpus(out, workers)


def read_corpus(out: Path, kind: str) -> list:
    """Every document of one kind, as the tokenizer and shards stages read them."""
    return [d for part in corpus_parts(out, kind) for d in part_docs(part)]


def files_params(**kw) -> FilesCorpus:
    """corpus.files of the repository's params.yaml with ``kw`` set (lists of paths)."""
    return study_params({"corpus": {"files": kw}}).corpus.files


def build(tmp: Path) -> tuple[FilesCorpus, dict]:
    """Fixtures of all three kinds with one or more of every corruption; returns the params
    and what must be kept, per kind, as (source key, texts, images)."""
    png, jpg, webp = img("PNG", 16, 12, 1), img("JPEG", 20, 24, 2), img("WEBP", 30, 10, 3)
    big, tiny = img("PNG", 64, 64, 4), img("PNG", 4, 4, 5)
    cut_png = img("PNG", 32, 32, 6)
    cut_png = cut_png[: len(cut_png) // 2]
    caps = tmp / "caps"
    caps.mkdir()
    write_tar(
        caps / "a.tar",
        [
            ("ok0.png", png),
            ("ok0.txt", b"a red circle"),
            ("ok0.json", json.dumps({"url": "http://x/0", "width": 16}).encode()),
            ("v1.0/ok.jpeg", jpg),  # key "v1.0/ok": dots in folders stay in the key
            ("v1.0/ok.txt", "caf\u00e9 au lait".encode()),
            ("ok3.webp", webp),
            ("ok3.txt", b"three"),
            ("ok3.json", b"{not json"),  # kept, without "orig"
            ("rand.jpg", b"certainly not an image " * 40),
            ("rand.txt", b"random"),
            ("cut.png", cut_png),
            ("cut.txt", b"cut"),
            ("big.png", big),
            ("big.txt", b"big"),
            ("tiny.png", tiny),
            ("tiny.txt", b"tiny"),
            ("blank.png", png),
            ("blank.txt", b"  \n\t"),
            ("latin.png", png),
            ("latin.txt", b"caf\xe9 \xff"),
            ("noimg.txt", b"no image"),
            ("notxt.jpg", jpg),
            ("ok0.png", jpg),  # a repeated key: kept, with a unique canonical key
            ("ok0.txt", b"again"),
        ],
    )
    b = write_tar(
        caps / "b.tar",
        [("b0.png", png), ("b0.txt", b"b zero"), ("b1.png", png), ("b1.txt", b"b one")],
    )
    (caps / "b.tar").write_bytes(b[: data_offset(b, "b1.png") + 10])  # cut inside b1's image
    c = write_tar(
        caps / "c.tar",
        [("c0.png", png), ("c0.txt", b"c zero"), ("c1.png", png), ("c1.txt", b"c one")],
    )
    # cut on a block boundary before c1: tarfile alone ends there without a word
    (caps / "c.tar").write_bytes(c[: data_offset(c, "c1.png") - 512])

    inter = tmp / "inter"
    inter.mkdir()
    rows = [
        ("doc.1", ["intro", None, "outro"], [None, png, None]),  # kept
        ("k1", ["a", None], [None]),  # lengths differ
        ("k2", ["a", "b"], [png, None]),  # text and image at position 0
        ("k3", ["a", None], [None, b"garbage bytes"]),  # corrupt image
        ("k4", ["only text"], [None]),  # no image
        ("k5", ["   ", None], [None, png]),  # empty text segment
        ("k6", [None, "between", None], [jpg, None, webp]),  # kept
        (None, ["no key", None], [None, png]),  # kept, key from the row index
        ("k8", [None, "a"], [cut_png, None]),  # truncated image
    ]
    pq.write_table(
        pa.table(
            {
                "key": [r[0] for r in rows],
                "texts": pa.array([r[1] for r in rows], pa.list_(pa.string())),
                "images": pa.array([r[2] for r in rows], pa.list_(pa.binary())),
            }
        ),
        inter / "a.parquet",
    )
    # HF-datasets style: int ids, image structs, a non-UTF-8 string (parquet does not check)
    bad_utf8 = pa.array([[b"\xff\xfe", None], [b"ok", None]], pa.list_(pa.binary()))
    structs = pa.array(
        [[None, {"bytes": png, "path": "p.png"}], [None, {"bytes": jpg, "path": "q.jpg"}]],
        pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
    )
    pq.write_table(
        pa.table({"id": [7, 8], "texts": bad_utf8.view(pa.list_(pa.string())), "images": structs}),
        inter / "b.parquet",
    )
    (inter / "c.parquet").write_bytes(b"PAR1 this is no parquet file")

    texts = tmp / "texts"
    texts.mkdir()
    lines = [
        b'{"text": "first doc", "url": "u"}',
        b"{bad json",
        b'{"txt": "missing field"}',
        b'{"text": "caf\xe9"}',
        b'{"text": "   "}',
        b"",  # a blank line is no record
        b'{"text": 5}',
        b'["text"]',
        b'{"text": "lone \\ud800 surrogate"}',
        b'{"text": "second doc\\nwith two lines"}',
    ]
    (texts / "a.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    (texts / "b.jsonl.gz").write_bytes(gzip.compress(b'{"text": "zipped"}\n{"text": "two"}\n'))
    pq.write_table(pa.table({"text": ["p0", "", None, "p3"]}), texts / "c.parquet")

    params = files_params(
        caption=[str(caps / "*.tar")],
        interleaved=[str(inter / "*.parquet")],
        text=[str(texts / "a.jsonl"), str(texts / "*.jsonl.gz"), str(texts / "**/*.parquet")],
        max_bad_fraction=1.0,
        max_image_side=MAX_SIDE,
        min_image_side=MIN_SIDE,
    )
    kept = {
        "caption": [
            ("ok0", [None, "a red circle"], [png, None]),
            ("v1.0/ok", [None, "caf\u00e9 au lait"], [jpg, None]),
            ("ok3", [None, "three"], [webp, None]),
            ("ok0", [None, "again"], [jpg, None]),
            ("b0", [None, "b zero"], [png, None]),
            ("c0", [None, "c zero"], [png, None]),
        ],
        "interleaved": [
            ("doc.1", rows[0][1], rows[0][2]),
            ("k6", rows[6][1], rows[6][2]),
            ("00000007", rows[7][1], rows[7][2]),
            ("8", ["ok", None], [None, jpg]),
        ],
        "text": [
            ("1", ["first doc"], [None]),
            ("10", ["second doc\nwith two lines"], [None]),
            ("1", ["zipped"], [None]),
            ("2", ["two"], [None]),
            ("0", ["p0"], [None]),
            ("3", ["p3"], [None]),
        ],
    }
    return params, kept


EXPECTED_BAD = {
    "caption": {
        "undecodable_image": 1,
        "truncated_image": 1,
        "oversized_image": 1,
        "undersized_image": 1,
        "empty_text": 1,
        "non_utf8_text": 1,
        "unpaired": 2,
        "unreadable_file": 2,  # b.tar (cut in data) and c.tar (cut on a block boundary)
    },
    "interleaved": {
        "malformed_record": 3,
        "undecodable_image": 1,
        "empty_text": 1,
        "truncated_image": 1,
        "non_utf8_text": 1,
        "unreadable_file": 1,
    },
    "text": {"malformed_record": 5, "non_utf8_text": 2, "empty_text": 2},
}


def test_every_reason_counted_and_kept_docs_read_back(tmp_path):
    params, kept = build(tmp_path)
    out = tmp_path / "corpus"
    report = corpus_stage(params, out)

    assert sorted(p.name for p in out.iterdir()) == ["report.json"]  # no copy of the data
    listing = json.loads((out / "report.json").read_text())
    assert listing["source"] == "files" and listing["max_bad_fraction"] == 1.0
    assert report["source"] == "files" and report["max_bad_fraction"] == 1.0
    assert set(report["kinds"]) == {"caption", "interleaved", "text"}
    seen_reasons = set()
    for kind, k in report["kinds"].items():
        assert k["bad"] == EXPECTED_BAD[kind], kind
        assert k["kept"] == len(kept[kind]), kind
        assert k["read"] == k["kept"] + sum(k["bad"].values())
        assert k["bad_fraction"] == pytest.approx(sum(k["bad"].values()) / k["read"], abs=1e-6)
        inputs = listing["kinds"][kind]["inputs"]
        assert [r["path"] for r in k["parts"]] == [r["path"] for r in inputs]
        assert [r["path"] for r in inputs] == listing["kinds"][kind]["files"]
        assert sum(r["kept"] for r in k["parts"]) == k["kept"]
        assert all(r["size"] == os.path.getsize(r["path"]) and r["version"] for r in inputs)
        assert listing["kinds"][kind]["bytes"] == sum(r["size"] for r in inputs)
        seen_reasons |= set(k["bad"])
    assert seen_reasons == set(REASONS)
    assert [Path(f).name for f in listing["kinds"]["caption"]["files"]] == [
        "a.tar",
        "b.tar",
        "c.tar",
    ]
    assert [Path(f).name for f in listing["kinds"]["text"]["files"]] == [
        "a.jsonl",
        "b.jsonl.gz",
        "c.parquet",
    ]
    assert report["breaches"] == []
    json.dumps(report)  # the shards stage writes it as report.json

    for kind in ("caption", "interleaved", "text"):
        docs = read_corpus(out, kind)
        assert [(d.texts, d.images) for d in docs] == [(t, i) for _, t, i in kept[kind]]
        assert [d.meta["source"].rsplit(":", 1)[1] for d in docs] == [s for s, _, _ in kept[kind]]
        keys = [d.key for d in docs]
        assert len(set(keys)) == len(keys)
        assert all("." not in k and "/" not in k and k.startswith(kind) for k in keys)
        assert all(d.meta["entropy_nats"] is None for d in docs)

    caps = read_corpus(out, "caption")
    assert [d.key for d in caps[:4]] == [
        "caption-00000-ok0",
        "caption-00000-v1_0_ok",
        "caption-00000-ok3",
        "caption-00000-ok0-2",
    ]
    assert caps[0].meta["orig"] == {"url": "http://x/0", "width": 16}
    assert "orig" not in caps[2].meta
    assert caps[4].key == "caption-00001-b0"
    inter = read_corpus(out, "interleaved")
    assert [d.key for d in inter] == [
        "interleaved-00000-doc_1",
        "interleaved-00000-k6",
        "interleaved-00000-00000007",
        "interleaved-00001-8",
    ]


def test_threshold_breach_raises_with_report(tmp_path):
    params, _ = build(tmp_path)
    strict = params.model_copy(update={"max_bad_fraction": 0.5})
    with pytest.raises(IngestError) as err:
        corpus_stage(strict, tmp_path / "corpus")
    msg = str(err.value)
    # caption 10/16, interleaved 8/12 and text 9/15 are bad; each is named with its counts
    for kind in ("caption", "interleaved", "text"):
        assert f"{kind}: bad fraction" in msg
    assert "0.5" in msg and "unpaired=2" in msg and "unreadable_file=1" in msg
    report = err.value.report
    assert report["max_bad_fraction"] == 0.5
    assert report["kinds"]["caption"]["bad"] == EXPECTED_BAD["caption"]
    assert report["kinds"]["caption"]["kept"] == 6


def test_breach_names_only_the_bad_kind(tmp_path):
    params, _ = build(tmp_path)
    only_text = files_params(text=params.text, max_bad_fraction=0.5)
    with pytest.raises(IngestError, match=r"text: bad fraction 0\.6000 > max_bad_fraction 0\.5"):
        corpus_stage(only_text, tmp_path / "strict")
    ok = files_params(text=params.text, max_bad_fraction=0.6)  # 9/15: not above
    report = corpus_stage(ok, tmp_path / "ok")
    empty = {"parts": [], "read": 0, "kept": 0, "bad": {}, "bad_fraction": 0.0}
    for kind in ("caption", "interleaved"):
        assert report["kinds"][kind] == empty
    assert report["kinds"]["text"]["kept"] == 6


def test_pattern_matching_nothing_raises_before_work(tmp_path):
    (tmp_path / "t.jsonl").write_text('{"text": "x"}\n')
    missing = str(tmp_path / "nowhere" / "*.tar")
    params = files_params(text=[str(tmp_path / "t.jsonl")], caption=[missing])
    with pytest.raises(IngestError, match="nowhere") as err:
        list_inputs(params)
    assert err.value.report is None


def test_unknown_format_raises(tmp_path):
    (tmp_path / "t.csv").write_text("text\nx\n")
    with pytest.raises(IngestError, match=r"t\.csv"):
        list_inputs(files_params(text=[str(tmp_path / "*")]))


def test_cut_gzip_counts_unreadable_and_keeps_lines_before(tmp_path):
    body = b"".join(b'{"text": "line %d"}\n' % i for i in range(5000))
    packed = gzip.compress(body)
    (tmp_path / "cut.jsonl.gz").write_bytes(packed[: len(packed) // 2])
    params = files_params(text=[str(tmp_path / "cut.jsonl.gz")], max_bad_fraction=0.01)
    report = corpus_stage(params, tmp_path / "corpus")
    k = report["kinds"]["text"]
    assert k["bad"] == {"unreadable_file": 1}
    assert 0 < k["kept"] < 5000 and k["read"] == k["kept"] + 1
    assert [d.text for d in read_corpus(tmp_path / "corpus", "text")] == [
        f"line {i}" for i in range(k["kept"])
    ]


def test_two_workers_count_what_one_process_does(tmp_path):
    """A task per input file: the report (counts by reason summed over tasks, each input's
    counts) is that of one process."""
    params, _ = build(tmp_path)
    two = corpus_stage(params, tmp_path / "two", workers=2)
    assert two == corpus_stage(params, tmp_path / "one", workers=1)


def test_an_input_changed_since_the_corpus_stage_is_refused(tmp_path):
    """The readers of the corpus read the inputs where they lie: a file of another size, or of
    the same size and another version tag (rewritten since), is refused before it is read; a
    report without checks (an older corpus stage, which copied the data) is refused too. Each
    error says what to rerun."""
    path = tmp_path / "t.jsonl"
    lines = [f'{{"text": "d{i}"}}\n' for i in range(5)]
    path.write_text("".join(lines))
    out = tmp_path / "corpus"
    corpus_stage(files_params(text=[str(path)]), out)
    assert [d.text for d in read_corpus(out, "text")] == [f"d{i}" for i in range(5)]

    st = os.stat(path)
    path.write_text("".join(lines[:4]) + '{"txet": "d4"}\n')  # as long, one record malformed
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    with pytest.raises(StaleInput, match=r"size 75 -> 75, version .*dvc repro --force corpus"):
        read_corpus(out, "text")
    path.write_text("".join(lines[:3]))
    with pytest.raises(StaleInput, match=r"since the corpus stage listed it \(size 75 -> 45"):
        read_corpus(out, "text")

    path.unlink()
    with pytest.raises(StaleInput, match=r"t\.jsonl no longer exists .*dvc repro --force corpus"):
        read_corpus(out, "text")

    report = json.loads((out / "report.json").read_text())
    del report["checks"]
    write_json(out / "report.json", report)
    with pytest.raises(StaleInput, match=r"older corpus stage .*dvc repro corpus"):
        corpus_parts(out, "text")


@pytest.mark.parametrize(
    "error, counted",
    [
        (ConnectionResetError(104, "Connection reset by peer"), False),
        (PermissionError(13, "Access Denied"), False),
        (gzip.BadGzipFile("Not a gzipped file"), True),
        (EOFError("Compressed file ended before the end-of-stream marker"), True),
    ],
    ids=["reset", "denied", "bad-gzip", "cut"],
)
def test_the_stores_trouble_fails_the_read_and_a_cut_file_counts(tmp_path, monkeypatch, error,
                                                                 counted):  # fmt: skip
    """An error of the store (the network, permissions: an errno) mid-file propagates, so the
    task fails and runs again, instead of counting the rest of the file as one unreadable file;
    a file's own fault (a cut or garbled stream) is counted and the samples before it kept."""
    from stages.data import ingest

    def two_then_error(path, file_index, check):
        yield from (ingest.Doc.text_only(f"text-{file_index}-{i}", f"d{i}") for i in range(2))
        raise error

    monkeypatch.setitem(ingest.READERS, "text", two_then_error)
    (tmp_path / "t.jsonl").write_text('{"text": "x"}\n')
    params = files_params(text=[str(tmp_path / "t.jsonl")], max_bad_fraction=1.0)
    if counted:
        k = corpus_stage(params, tmp_path / "corpus", workers=1)["kinds"]["text"]
        assert (k["kept"], k["bad"]) == (2, {"unreadable_file": 1})
    else:
        with pytest.raises(type(error)):
            corpus_stage(params, tmp_path / "corpus", workers=1)


def test_the_tokenizer_trains_on_a_seeded_sample_of_files_per_kind(tmp_path):
    """tokenizer.max_files: 1 reads one input file per kind (texts of 3 files, a subset of all),
    the same on a rerun; a bound above the file count reads everything in order."""
    from stages.data.tokenizer import corpus_texts

    params, _ = build(tmp_path)
    out = tmp_path / "corpus"
    corpus_stage(params, out)
    every = list(corpus_texts(out))
    assert all(len(corpus_parts(out, k)) >= 2 for k in ("caption", "interleaved", "text"))
    assert list(corpus_texts(out, max_files=100)) == every
    one = list(corpus_texts(out, max_files=1, seed=5))
    assert one == list(corpus_texts(out, max_files=1, seed=5))
    assert 3 <= len(one) < len(every) and set(one) <= set(every)
