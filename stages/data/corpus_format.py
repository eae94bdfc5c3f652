"""The corpus on disk: the three formats public data comes in, one reader beside one writer.

``data/corpus/`` holds what the ``corpus`` stage produced (synthetic, or real data that passed
ingestion), in the formats of the public data sets the paper trained on:

- ``caption/caption-NNNNNN.tar``: img2dataset-style webdataset tars, one sample per key with
  ``key.png|jpg|webp`` (the image), ``key.txt`` (the caption) and ``key.json`` (metadata);
- ``interleaved/interleaved-NNNNNN.parquet``: OBELICS-style rows with ``texts: list<string>``
  and ``images: list<binary>`` aligned by position (exactly one of the two is non-null at each
  position), plus ``key`` and ``meta`` (a JSON string);
- ``text/text-NNNNNN.jsonl``: DCLM-style JSON lines with a ``text`` field (plus ``key``, ``meta``).

In memory every sample is a :class:`Doc`: the OBELICS view (aligned ``texts``/``images``) that
fits all three kinds. ``meta["entropy_nats"]`` is the exact entropy of the text given the
images for synthetic samples (see stages/data/synthetic.py) and ``None`` for real data.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds

from stages.data.kinds import KINDS

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
TEXT_EXT = "txt"
META_EXT = "json"
INTERLEAVED_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("texts", pa.list_(pa.string())),
        ("images", pa.list_(pa.binary())),
        ("meta", pa.string()),
    ]
)


@dataclass(frozen=True)
class Doc:
    """One sample of any kind: text segments and encoded images, in reading order."""

    key: str
    kind: str
    texts: list[str | None]
    images: list[bytes | None]
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        assert self.kind in KINDS, self.kind
        assert len(self.texts) == len(self.images), (self.key, len(self.texts), len(self.images))
        for t, im in zip(self.texts, self.images, strict=True):
            assert (t is None) != (im is None), f"{self.key}: each position is text xor image"

    @classmethod
    def caption(cls, key: str, image: bytes, text: str, meta: dict | None = None) -> Doc:
        return cls(key, "caption", [None, text], [image, None], dict(meta or {}))

    @classmethod
    def text_only(cls, key: str, text: str, meta: dict | None = None) -> Doc:
        return cls(key, "text", [text], [None], dict(meta or {}))

    @property
    def n_images(self) -> int:
        return sum(im is not None for im in self.images)

    @property
    def text(self) -> str:
        """All text segments joined (what a tokenizer trainer sees)."""
        return "\n".join(t for t in self.texts if t is not None)


def image_ext(data: bytes) -> str:
    """File extension for encoded image bytes, from their magic number."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return "png"  # unknown: the reader will refuse to decode it, and count it


def _file_pattern(root: Path, kind: str) -> str:
    ext = {"caption": "tar", "interleaved": "parquet", "text": "jsonl"}[kind]
    return str(root / kind / f"{kind}-%06d.{ext}")


class CorpusWriter:
    """Streams docs of one kind into ``root/kind/`` files of ``samples_per_file`` samples:
    ``{kind}-NNNNNN.ext`` (``corpus_files`` sorts them in writing order).

    Memory is bounded by one file's worth of interleaved rows; output bytes depend only on the
    docs written (fixed tar mtime, sorted JSON keys), so a seeded corpus is reproducible.
    """

    def __init__(self, root: str | Path, kind: str, samples_per_file: int = 5000):
        assert kind in KINDS, kind
        self.root, self.kind, self.per_file = Path(root), kind, samples_per_file
        (self.root / kind).mkdir(parents=True, exist_ok=True)
        self.pattern = _file_pattern(self.root, kind)
        self.count = 0
        self.files: list[str] = []
        self._tar: wds.ShardWriter | None = None
        self._rows: list[dict[str, Any]] = []
        self._jsonl: io.TextIOBase | None = None

    def __enter__(self) -> CorpusWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def write(self, doc: Doc) -> None:
        assert doc.kind == self.kind, (doc.kind, self.kind)
        meta = json.dumps(doc.meta, sort_keys=True)
        if self.kind == "caption":
            if self._tar is None:
                self._tar = wds.ShardWriter(
                    self.pattern, maxcount=self.per_file, mtime=0, verbose=0
                )
            image, text = doc.images[0], doc.texts[1]
            assert image is not None and text is not None, doc.key
            self._tar.write(
                {"__key__": doc.key, image_ext(image): image, TEXT_EXT: text, META_EXT: meta}
            )
            if self._tar.fname and self._tar.fname not in self.files:
                self.files.append(self._tar.fname)
        elif self.kind == "interleaved":
            self._rows.append(
                {"key": doc.key, "texts": doc.texts, "images": doc.images, "meta": meta}
            )
            if len(self._rows) >= self.per_file:
                self._flush_parquet()
        else:
            if self._jsonl is None or self.count % self.per_file == 0:
                self._open_jsonl()
            rec = {"key": doc.key, "text": doc.texts[0], "meta": doc.meta}
            self._jsonl.write(json.dumps(rec, sort_keys=True, ensure_ascii=False) + "\n")
        self.count += 1

    def _open_jsonl(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        name = self.pattern % len(self.files)
        self._jsonl = open(name, "w", encoding="utf-8", newline="\n")  # noqa: SIM115
        self.files.append(name)

    def _flush_parquet(self) -> None:
        if not self._rows:
            return
        name = self.pattern % len(self.files)
        table = pa.Table.from_pylist(self._rows, schema=INTERLEAVED_SCHEMA)
        pq.write_table(table, name, row_group_size=512, compression="zstd")
        self.files.append(name)
        self._rows = []

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None
        self._flush_parquet()
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None


def corpus_files(root: str | Path, kind: str) -> list[Path]:
    """The corpus files of one kind, in their canonical (sorted) order."""
    ext = {"caption": "tar", "interleaved": "parquet", "text": "jsonl"}[kind]
    return sorted((Path(root) / kind).glob(f"{kind}-*.{ext}"))


def split_key(name: str) -> tuple[str, str]:
    """webdataset's rule: the key is the path up to the first dot of the base name."""
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1 :].lower()


class _LastRead:
    """A tar's stream that keeps what its last read returned: after the last member, the block
    where the next header would be (all zeros at the end of a whole archive)."""

    def __init__(self, stream: Any):
        self._stream, self.last = stream, b""

    def read(self, n: int = -1) -> bytes:
        self.last = self._stream.read(n)
        return self.last

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def iter_tar_groups(
    source: str | Path | BinaryIO, end: dict[str, bool] | None = None
) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield ``(key, {ext: bytes})`` for consecutive members of a tar (a path, or a binary file
    such as an object in storage) sharing a key.

    Streams the tar (constant memory, one read). Raises ``tarfile.TarError``/``OSError`` on a
    corrupt or truncated tar after yielding the groups read so far; callers decide how to count
    that. Python's ``tarfile`` ends *silently* at a tar cut on a block boundary, so ``end``
    (when given) gets ``whole``: whether the last member was followed by an end-of-archive block.
    """
    key, group = None, {}
    where = {"fileobj": source} if hasattr(source, "read") else {"name": source}
    with tarfile.open(mode="r|*", **where) as tf:
        tf.fileobj = stream = _LastRead(tf.fileobj)
        for member in tf:
            if not member.isfile():
                continue
            k, ext = split_key(member.name)
            if k != key and key is not None:
                yield key, group  # before reading on: a cut in this member loses only it
                group = {}
            key = k
            fobj = tf.extractfile(member)
            group[ext] = fobj.read() if fobj is not None else b""
        if end is not None:
            block = stream.last
            end["whole"] = len(block) == tarfile.BLOCKSIZE and block.count(0) == len(block)
    if key is not None:
        yield key, group


def iter_docs(root: str | Path, kind: str, files: list[Path] | None = None) -> Iterator[Doc]:
    """Stream the canonical corpus of one kind (as written by :class:`CorpusWriter`): all its
    files, or ``files`` of them."""
    for path in corpus_files(root, kind) if files is None else files:
        if kind == "caption":
            for key, g in iter_tar_groups(path):
                ext = next(e for e in IMAGE_EXTS if e in g)
                meta = json.loads(g[META_EXT]) if META_EXT in g else {}
                yield Doc.caption(key, g[ext], g[TEXT_EXT].decode("utf-8"), meta)
        elif kind == "interleaved":
            pf = pq.ParquetFile(path)
            for batch in pf.iter_batches(batch_size=256):
                for row in batch.to_pylist():
                    meta = json.loads(row["meta"]) if row.get("meta") else {}
                    yield Doc(row["key"], kind, row["texts"], row["images"], meta)
        else:
            with open(path, encoding="utf-8") as f:
                for line in f:
                    rec = json.loads(line)
                    yield Doc.text_only(rec["key"], rec["text"], rec.get("meta") or {})


def write_json(path: str | Path, obj: Any) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
