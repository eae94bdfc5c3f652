"""Sharding (stage ``shards``, entry point stages/shards.py): every corpus sample tokenized
into webdataset train/val shards per kind.

Reads ``data/corpus`` and ``data/tokenizer/tokenizer.json``; writes
``data/shards/{train,val}/{kind}-NNNNNN.tar``, ``manifest.parquet`` and ``info.json`` (layout in
stages/data/shard_format.py). Streams: memory does not grow with the corpus. Deterministic: the same
corpus, tokenizer and params give byte-identical shards (fixed tar mtime, stable key-hash split).
"""

from __future__ import annotations

import json
import logging
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds
from tokenizers import Tokenizer
from tqdm import tqdm

from stages.common.stage import fresh_dir, run_per_kind
from stages.data.corpus_format import iter_docs, write_json
from stages.data.kinds import KINDS
from stages.data.shard_format import (
    MANIFEST_SCHEMA,
    SPLITS,
    Sample,
    encode_doc,
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
    """Rotating tar writer for one (kind, split) that keeps the manifest row of each shard."""

    def __init__(self, root: Path, kind: str, split: str, per_shard: int, image_tokens: int):
        self.root, self.kind, self.split = root, kind, split
        self.per_shard, self.image_tokens = per_shard, image_tokens
        self.rows: list[dict[str, Any]] = []
        self._tar: wds.TarWriter | None = None
        (root / split).mkdir(parents=True, exist_ok=True)

    def write(self, s: Sample) -> None:
        if self._tar is None or self.rows[-1]["samples"] >= self.per_shard:
            self._finish()
            rel = f"{self.split}/{self.kind}-{len(self.rows):06d}.tar"
            self._tar = wds.TarWriter(str(self.root / rel), mtime=0)
            self.rows.append(
                dict(
                    path=rel,
                    kind=self.kind,
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
        if self._tar is not None:
            self._tar.close()
            self._tar = None
            self.rows[-1]["sha256"] = sha256_file(self.root / self.rows[-1]["path"])

    def close(self) -> list[dict[str, Any]]:
        self._finish()
        return self.rows


def shard_kind(
    kind: str, corpus: Path, tokenizer_path: Path, out: Path, p: ShardsParams, total: int | None
) -> list[dict[str, Any]]:
    """Write the shards of one kind; return their manifest rows."""
    tok = Tokenizer.from_file(str(tokenizer_path))
    special = special_ids(tok)
    writers = {s: _SplitWriter(out, kind, s, p.samples_per_shard, p.image_tokens) for s in SPLITS}
    docs = iter_docs(corpus, kind)
    with tqdm(total=total, desc=f"shards {kind}", unit="doc", mininterval=2) as bar:
        while chunk := list(islice(docs, CHUNK)):
            texts = [t for d in chunk for t in d.texts if t is not None]
            encoded = iter(tok.encode_batch(texts, add_special_tokens=False))
            for d in chunk:
                enc = [next(encoded) for t in d.texts if t is not None]
                text_ids = [e.ids for e in enc]
                text_tags = None
                if d.meta.get("word_tags") is not None:  # synthetic: roles and entity ranks
                    words = [(t, w) for t, w in zip(d.texts, d.meta["word_tags"], strict=True) if t]
                    text_tags = [
                        token_tags(t, w, e.offsets) for (t, w), e in zip(words, enc, strict=True)
                    ]
                images = [prepare_image(b, p.image_size) for b in d.images if b is not None]
                ids, tags = encode_doc(
                    d.texts, text_ids, images, special, p.image_tokens, text_tags
                )
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
                )
                writers[split_of(d.key, p.val_fraction)].write(sample)
            bar.update(len(chunk))
    return [row for s in SPLITS for row in writers[s].close()]


def build_shards(
    corpus: Path, tokenizer_path: Path, out: Path, p: ShardsParams, workers: int | None = None
) -> list[dict[str, Any]]:
    fresh_dir(out)
    report = corpus / "report.json"
    kept = {}
    if report.exists():
        kept = {k: v.get("kept") for k, v in json.loads(report.read_text())["kinds"].items()}
    jobs = [(k, corpus, tokenizer_path, out, p, kept.get(k)) for k in KINDS]
    rows = [r for rows in run_per_kind(shard_kind, jobs, workers) for r in rows]
    pq.write_table(pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA), out / "manifest.parquet")
    tok = Tokenizer.from_file(str(tokenizer_path))
    write_json(out / "info.json", shard_info(rows, tok, p))
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
