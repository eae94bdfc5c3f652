"""Sharding (stage ``shards``, entry point stages/shards.py): every corpus sample tokenized
into webdataset train/val shards, one task per corpus file (generated data) or input file (real
data, read once where it lies, each sample checked and each bad one counted in the same pass:
stages/data/ingest.py).

Reads ``data/corpus`` and ``data/tokenizer/tokenizer.json``; writes
``data/shards/{train,val}/{kind}-FFFFFF-KKKK.tar`` (corpus or input file F, its K-th shard of that
split), ``manifest.parquet``, ``info.json`` (layout in stages/data/shard_format.py) and
``report.json`` (samples read, kept and skipped by reason, per kind and part); with
``shards.url`` the shards go to object storage and ``data/shards`` keeps the manifest,
info and report, a few kB that DVC versions. The tasks run in a local pool or on a Ray cluster
(``data.engine``: stages/common/engine.py). Streams: memory does not grow with the corpus.
Deterministic: the same corpus, tokenizer and params give byte-identical shards (fixed tar
mtime, stable key-hash split, names from the file), whatever the engine and workers.
"""

from __future__ import annotations

import io
import logging
import os
import tempfile
from collections import Counter
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds
from PIL import Image
from tokenizers import Tokenizer

from stages.common.engine import run_tasks
from stages.common.stage import fresh_dir
from stages.data.corpus_format import image_ext, write_json
from stages.data.ingest import Part, check_threshold, corpus_parts, part_docs, tally
from stages.data.kinds import KINDS
from stages.data.shard_format import (
    MANIFEST_SCHEMA,
    SPLITS,
    Sample,
    encode_doc,
    encode_image,
    is_url,
    join,
    prepare_image,
    sample_record,
    sha256_file,
    split_of,
    text_target_mask,
    token_tags,
)
from stages.data.tokenizer import special_ids
from stages.params import ShardsParams

log = logging.getLogger(__name__)
CHUNK = 256  # docs tokenized per encode_batch call


class _SplitWriter:
    """Rotating tar writer for one (kind, split) of one corpus file that keeps the manifest row
    of each shard. A shard is written to a temporary file and moved into place (a folder) or
    uploaded (a URL) once whole: a reader never sees part of one, a retried task rewrites it."""

    def __init__(self, store: str | Path, name: str, split: str, per_shard: int,
                 image_tokens: int):  # fmt: skip
        self.store, self.name, self.split = store, name, split
        self.per_shard, self.image_tokens = per_shard, image_tokens
        self.rows: list[dict[str, Any]] = []
        self._tar: wds.TarWriter | None = None
        self._tmp: Path | None = None

    def write(self, s: Sample) -> None:
        if self._tar is None or self.rows[-1]["samples"] >= self.per_shard:
            self._finish()
            rel = f"{self.split}/{self.name}-{len(self.rows):04d}.tar"
            self._tmp = _scratch(self.store, rel)
            self._tar = wds.TarWriter(str(self._tmp), mtime=0)
            path = join(self.store, rel)
            self.rows.append(
                dict(
                    path=str(path) if is_url(path) else rel,
                    kind=s.kind,
                    split=self.split,
                    samples=0,
                    tokens=0,
                    text_tokens=0,
                    images=0,
                    image_tokens=0,
                    entropy_nats=0.0,
                    entropy_nats_blind=0.0,
                    sha256="",
                )
            )
        self._tar.write(sample_record(s))
        row = self.rows[-1]
        row["samples"] += 1
        row["tokens"] += len(s.ids)
        row["text_tokens"] += s.targets
        row["images"] += len(s.images)
        row["image_tokens"] += len(s.images) * self.image_tokens
        for k in ("entropy_nats", "entropy_nats_blind"):  # unknown (None) once one is unknown
            x = getattr(s, k)
            row[k] = None if row[k] is None or x is None else row[k] + x

    def _finish(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        self._tar = None
        row, tmp = self.rows[-1], self._tmp
        row["sha256"] = sha256_file(tmp)
        dest = join(self.store, f"{self.split}/{Path(row['path']).name}")
        if is_url(dest):
            import fsspec

            fs, inner = fsspec.core.url_to_fs(str(dest))
            fs.put_file(str(tmp), inner)
            tmp.unlink()
        else:
            os.replace(tmp, dest)

    def close(self) -> list[dict[str, Any]]:
        self._finish()
        return self.rows


def _scratch(store: str | Path, rel: str) -> Path:
    """Where a shard is written before it is whole: beside it in a folder, else a temp file."""
    if is_url(store):
        fd, name = tempfile.mkstemp(suffix=".tar", prefix="shard-")
        os.close(fd)
        return Path(name)
    dest = Path(store) / rel
    dest.parent.mkdir(parents=True, exist_ok=True)
    return dest.with_name(f".{dest.name}.tmp")


def store_image(data: bytes, p: ShardsParams) -> tuple[np.ndarray, tuple[str, bytes]]:
    """One source image as stored: (pixels, (extension, bytes)). The pixels are centre-cropped
    and resized to ``image_size``; the bytes are the source's own where that changed nothing
    (its size was already ``image_size`` square), else the pixels re-encoded as ``p.encode``.
    Lossless either way except a re-encode to jpeg/webp (the loader decodes what is stored)."""
    pixels = prepare_image(data, p.image_size)
    with Image.open(io.BytesIO(data)) as im:
        unchanged = im.size == (p.image_size, p.image_size)
    if unchanged and image_ext(data) in ("png", "jpg", "webp"):
        return pixels, (image_ext(data), data)
    return pixels, encode_image(pixels, p.encode, p.quality)


def shard_file(
    part: Part, tokenizer_path: Path, store: str | Path, p: ShardsParams
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One task: the samples of one part of the corpus (a corpus file, or an input file read
    where it lies and checked on the way, the ``index``-th of its kind) tokenized into shards
    ``{split}/{kind}-{index:06d}-{k:04d}.tar`` of ``store`` (a folder or URL); return their
    manifest rows (train, then val) and the part's counts (samples kept, skipped by reason)."""
    tok = Tokenizer.from_file(str(tokenizer_path))
    special = special_ids(tok)
    kind = part.kind
    name = f"{kind}-{part.index:06d}"
    writers = {s: _SplitWriter(store, name, s, p.samples_per_shard, p.image_tokens) for s in SPLITS}
    bad: Counter[str] = Counter()
    kept = 0
    docs = part_docs(part, bad)
    while chunk := list(islice(docs, CHUNK)):
        texts = [t for d in chunk for t in d.texts if t is not None]
        encoded = iter(tok.encode_batch(texts, add_special_tokens=False))
        kept += len(chunk)
        for d in chunk:
            enc = [next(encoded) for t in d.texts if t is not None]
            text_ids = [e.ids for e in enc]
            text_tags = None
            if d.meta.get("word_tags") is not None:  # synthetic: roles and entity ranks
                words = [(t, w) for t, w in zip(d.texts, d.meta["word_tags"], strict=True) if t]
                text_tags = [
                    token_tags(t, w, e.offsets) for (t, w), e in zip(words, enc, strict=True)
                ]
            stored = [store_image(b, p) for b in d.images if b is not None]
            images = [pixels for pixels, _ in stored]
            ids, tags = encode_doc(d.texts, text_ids, images, special, p.image_tokens, text_tags)
            shape = (len(images), p.image_size, p.image_size, 3)
            sample = Sample(
                key=d.key,
                kind=kind,
                ids=ids,
                images=np.stack(images) if images else np.zeros(shape, np.uint8),
                targets=int(text_target_mask(ids, special).sum()),
                entropy_nats=d.meta.get("entropy_nats"),
                entropy_nats_blind=d.meta.get("entropy_nats_blind"),
                tags=tags,
                encoded=None if p.images == "raw" else [e for _, e in stored],
            )
            writers[split_of(d.key, p.val_fraction)].write(sample)
    rows = [row for s in SPLITS for row in writers[s].close()]
    return rows, {"kept": kept, "bad": dict(sorted(bad.items()))}


def build_shards(
    corpus: Path,
    tokenizer_path: Path,
    out: Path,
    p: ShardsParams,
    workers: int | None = None,
    engine: str = "local",
    address: str | None = None,
) -> list[dict[str, Any]]:
    """Every corpus part (file) sharded by its own task (``engine``: stages/common/engine.py); the
    manifest and info in ``out``, and the shards there too, or at ``p.url`` (then the manifest
    names each shard by its URL, and a copy of both lies beside them). ``report.json`` in
    ``out``: samples read and kept per kind, each skipped one counted by reason (real data is
    checked in this same pass: stages/data/ingest.py); a kind with too many bad samples raises
    :class:`IngestError` before the manifest is written (no reader takes those shards), the
    report kept."""
    fresh_dir(out)
    store = p.url.rstrip("/") if p.url else out
    parts = [part for k in KINDS for part in corpus_parts(corpus, k)]
    tasks = [(part, tokenizer_path, store, p) for part in parts]
    done = run_tasks(shard_file, tasks, engine, address, workers, desc="shards")
    rows = [r for rows, _ in done for r in rows]
    report = tally(corpus, parts, [counts for _, counts in done])
    write_json(out / "report.json", report)
    check_threshold(report)  # (before the manifest: a failed stage publishes no shards)
    if not p.url:  # what a task on a lost worker left half-written (its rerun wrote it whole)
        for tmp in out.rglob(".*.tmp"):
            tmp.unlink()
    table = pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)
    pq.write_table(table, out / "manifest.parquet")
    tok = Tokenizer.from_file(str(tokenizer_path))
    write_json(out / "info.json", shard_info(rows, tok, p))
    if p.url:
        import fsspec

        fs, inner = fsspec.core.url_to_fs(store)
        for name in ("manifest.parquet", "info.json"):
            fs.put_file(str(out / name), f"{inner}/{name}")
    return rows


def shard_info(rows: list[dict[str, Any]], tok: Tokenizer, p: ShardsParams) -> dict[str, Any]:
    """Constants for readers, and per kind/split totals with the text-loss floors per token:
    ``floor_nats_per_token`` (with the images), ``floor_blind_nats_per_token`` (without them)
    and ``image_value_nats_per_token`` (their difference: what the images are worth)."""
    totals: dict[str, dict[str, Any]] = {}
    for r in rows:
        t = totals.setdefault(
            f"{r['split']}/{r['kind']}",
            dict(samples=0, tokens=0, text_tokens=0, images=0, entropy_nats=0.0,
                 entropy_nats_blind=0.0),
        )  # fmt: skip
        for k in ("samples", "tokens", "text_tokens", "images"):
            t[k] += r[k]
        for k in ("entropy_nats", "entropy_nats_blind"):
            t[k] = None if t[k] is None or r[k] is None else t[k] + r[k]
    for t in totals.values():
        n = t["text_tokens"]
        t["floor_nats_per_token"] = (
            t["entropy_nats"] / n if t["entropy_nats"] is not None and n else None
        )
        blind = t["entropy_nats_blind"]
        t["floor_blind_nats_per_token"] = blind / n if blind is not None and n else None
        t["image_value_nats_per_token"] = (
            t["floor_blind_nats_per_token"] - t["floor_nats_per_token"]
            if t["floor_blind_nats_per_token"] is not None and t["floor_nats_per_token"] is not None
            else None
        )
    return {
        "special_ids": special_ids(tok),
        "vocab_size": tok.get_vocab_size(),
        "image_size": p.image_size,
        "patch_size": p.patch_size,
        "image_tokens": p.image_tokens,
        "totals": totals,
    }
