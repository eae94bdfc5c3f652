"""The training-shard format: how one tokenized document is laid out, written and read.

This is the contract between the ``shards`` stage (writer) and the loader (reader); both go
through this module and nothing else knows the layout.

A shard is a webdataset tar ``data/shards/{split}/{kind}-FFFFFF-KKKK.tar`` (or at a URL,
``shards.url``); each sample has

- ``KEY.ids.npy``: int32 token ids of the whole document::

      <bos> [ <boi> <image>×T <eoi> | text tokens ]* <eos>

  one ``<image>`` placeholder per patch (``T = (image_size / patch_size)²``), segments in the
  document's reading order (caption: the image, then its caption);
- the images in order, centre-cropped and resized to the configured resolution, either
  encoded, ``KEY.img0.png``, ``KEY.img1.jpg``, ... (``shards.images: encoded``: the source's
  own bytes where it already had that size, else re-encoded as ``shards.encode``), or raw,
  ``KEY.images.npy``, uint8 ``(n_images, image_size, image_size, 3)`` (``shards.images: raw``);
  readers get the decoded RGB pixels either way (:func:`decode_record`);
- ``KEY.tags.npy`` (synthetic data only): int32 per position, ``rank * 4 + role`` of the word
  a text token belongs to (roles: template, name, attribute, value; rank 0: no entity;
  stages/data/synthetic.py), 0 at specials and image positions;
- ``KEY.json``: ``kind``, ``targets`` (loss targets: text tokens + ``<eos>``),
  ``entropy_nats`` and ``entropy_nats_blind`` (the synthetic world's floor for this document
  with and without its images, or null).

``data/shards/manifest.parquet`` has one row per shard (:data:`MANIFEST_SCHEMA`; its ``path``
relative to the folder, or the shard's URL) and
``data/shards/info.json`` the constants a reader needs (special ids, T, image size).
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from stages.data.kinds import KINDS

SPLITS = ("train", "val")
MANIFEST_SCHEMA = pa.schema(
    [
        ("path", pa.string()),  # relative to the shards directory, or a URL
        ("kind", pa.string()),
        ("split", pa.string()),
        ("samples", pa.int64()),
        ("tokens", pa.int64()),  # all positions, specials and image placeholders included
        ("text_tokens", pa.int64()),  # loss targets: text tokens and <eos>
        ("images", pa.int64()),
        ("image_tokens", pa.int64()),
        ("entropy_nats", pa.float64()),  # sum over samples; null when unknown (real data)
        ("entropy_nats_blind", pa.float64()),  # the same without the images
        ("sha256", pa.string()),
    ]
)
NON_TARGET = ("pad", "bos", "image", "boi", "eoi")  # specials that are never loss targets
# word tags (tags.npy): tag = rank * 4 + role; rank 0 when the word is about no entity
ROLES = ("template", "name", "attribute", "value")
TEMPLATE, NAME, ATTRIBUTE, VALUE = range(len(ROLES))


def tag(rank: int, role: int) -> int:
    return rank * len(ROLES) + role


@dataclass
class Sample:
    key: str
    kind: str
    ids: np.ndarray  # (L,) int32
    images: np.ndarray | EncodedImages  # (n, S, S, 3) uint8, or decoded when indexed
    targets: int
    entropy_nats: float | None
    entropy_nats_blind: float | None = None
    tags: np.ndarray | None = None  # (L,) int32 word tags, synthetic data only
    # the images as stored (extension, bytes), written instead of the raw ``images`` when set
    encoded: list[tuple[str, bytes]] | None = None


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


_NPY_HEADER = re.compile(
    rb"\{'descr': '([<|][a-z]\d)', 'fortran_order': False, 'shape': \(([\d, ]*)\), \}"
)


def _from_npy(b: bytes) -> np.ndarray:
    """np.load, minus its slow header parsing for the arrays :func:`_npy` writes (v1.0 headers)."""
    n = int.from_bytes(b[8:10], "little") if b[6:8] == b"\x01\x00" else 0
    m = _NPY_HEADER.match(b, 10, 10 + n) if n else None
    if m is None:
        return np.load(io.BytesIO(b), allow_pickle=False)
    shape = tuple(int(x) for x in m.group(2).split(b",") if x.strip())
    return np.frombuffer(b, dtype=m.group(1).decode(), offset=10 + n).reshape(shape)


def prepare_image(data: bytes, size: int) -> np.ndarray:
    """Decode, convert to RGB, centre-crop to a square and resize to ``size`` (uint8 HWC)."""
    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("RGB")
        w, h = im.size
        if w != h:
            s = min(w, h)
            left, top = (w - s) // 2, (h - s) // 2
            im = im.crop((left, top, left + s, top + s))
        if im.size != (size, size):
            im = im.resize((size, size), Image.Resampling.BICUBIC)
        return np.asarray(im, dtype=np.uint8)


class EncodedImages:
    """A sample's stored images, decoded one at a time when indexed (uint8 HWC): a reader that
    uses a few of a shard's images decodes those only."""

    def __init__(self, data: list[bytes]):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> np.ndarray:
        return decode_image(self.data[i])


IMAGE_KEY = re.compile(r"img(\d+)\.(png|jpg|webp)")


def encode_image(pixels: np.ndarray, fmt: str, quality: int) -> tuple[str, bytes]:
    """``pixels`` (uint8 HWC) encoded as ``fmt`` (png: lossless; jpeg/webp at ``quality``)."""
    buf = io.BytesIO()
    im = Image.fromarray(pixels)
    if fmt == "png":
        im.save(buf, format="PNG")
        return "png", buf.getvalue()
    if fmt == "jpeg":
        im.save(buf, format="JPEG", quality=quality)
        return "jpg", buf.getvalue()
    im.save(buf, format="WEBP", quality=quality)
    return "webp", buf.getvalue()


def decode_image(data: bytes) -> np.ndarray:
    """Stored image bytes as uint8 RGB pixels (HWC)."""
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


def token_tags(text: str, word_tags: list[int], offsets: list[tuple[int, int]]) -> list[int]:
    """The tag of each token of ``text`` (words joined by single spaces): the tag of the word
    its last character belongs to (``offsets``: the tokenizer's character spans)."""
    spaces = np.cumsum([c == " " for c in text])  # words started before each character
    return [word_tags[int(spaces[max(a, b - 1)])] if b > a else 0 for a, b in offsets]


def text_target_mask(ids: np.ndarray, special: dict[str, int]) -> np.ndarray:
    """True where a token is a text target (text tokens and ``<eos>``)."""
    return ~np.isin(ids, [special[n] for n in NON_TARGET])


def encode_doc(
    texts: list[str | None],
    text_ids: list[list[int]],
    images: list[np.ndarray],
    special: dict[str, int],
    image_tokens: int,
    text_tags: list[list[int]] | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Lay out one document: (ids, tags). ``text_ids`` (and ``text_tags``, one per token) are
    the tokenized non-null ``texts`` in order; tags are None without ``text_tags``."""
    parts: list[list[int]] = [[special["bos"]]]
    tags: list[list[int]] = [[0]]
    it_text, it_tags, n_img = iter(text_ids), iter(text_tags or []), 0
    for t in texts:
        if t is None:
            parts.append([special["boi"]] + [special["image"]] * image_tokens + [special["eoi"]])
            tags.append([0] * (image_tokens + 2))
            n_img += 1
        else:
            parts.append(next(it_text))
            tags.append(next(it_tags) if text_tags is not None else [])
    parts.append([special["eos"]])
    tags.append([0])
    assert n_img == len(images), (n_img, len(images))
    ids = np.fromiter((i for p in parts for i in p), dtype=np.int32)
    if text_tags is None:
        return ids, None
    out = np.fromiter((i for p in tags for i in p), dtype=np.int32)
    assert len(out) == len(ids), (len(out), len(ids))
    return ids, out


def sample_record(s: Sample) -> dict[str, Any]:
    meta = {
        "kind": s.kind,
        "targets": s.targets,
        "entropy_nats": s.entropy_nats,
        "entropy_nats_blind": s.entropy_nats_blind,
    }
    rec: dict[str, Any] = {"__key__": s.key, "ids.npy": _npy(s.ids)}
    if s.encoded is None:
        rec["images.npy"] = _npy(s.images)
    else:
        rec |= {f"img{i}.{ext}": data for i, (ext, data) in enumerate(s.encoded)}
    if s.tags is not None:
        rec["tags.npy"] = _npy(s.tags)
    return rec | {"json": json.dumps(meta, sort_keys=True)}


def decode_record(rec: dict[str, Any], image_size: int = 0, decode: bool = True) -> Sample:
    """One stored sample, its images decoded (``image_size``: the side of the empty image
    array of a sample without images in an encoded shard; 0 when unknown), or with
    ``decode=False`` encoded images as :class:`EncodedImages` (raw ones are arrays anyway)."""
    meta = json.loads(rec["json"])
    if "images.npy" in rec:
        images = _from_npy(rec["images.npy"])
    else:
        found = sorted((int(m.group(1)), k) for k in rec if (m := IMAGE_KEY.fullmatch(k)))
        if [i for i, _ in found] != list(range(len(found))):
            raise ValueError(f"sample {rec['__key__']}: images {[k for _, k in found]} not 0..n-1")
        shape = (0, image_size, image_size, 3)
        if not decode and found:
            images = EncodedImages([rec[k] for _, k in found])
        else:
            pixels = [decode_image(rec[k]) for _, k in found]
            images = np.stack(pixels) if pixels else np.zeros(shape, np.uint8)
    return Sample(
        key=rec["__key__"],
        kind=meta["kind"],
        ids=_from_npy(rec["ids.npy"]),
        images=images,
        targets=meta["targets"],
        entropy_nats=meta["entropy_nats"],
        entropy_nats_blind=meta.get("entropy_nats_blind"),
        tags=_from_npy(rec["tags.npy"]) if "tags.npy" in rec else None,
    )


def _tar_records(data: bytes) -> list[dict[str, Any]] | None:
    """Group a plain ustar archive's members into webdataset records, or None if not plain.

    Our shards are written by ``wds.TarWriter`` with integer mtimes and short names, so every
    member is one 512-byte header plus its data. Parsing that directly is ~5x faster than
    ``tarfile`` (measured in bench/loader_throughput.py); anything else (pax headers, long
    names, links) returns None and the caller falls back to webdataset's reader.
    """
    records: list[dict[str, Any]] = []
    pos, end = 0, len(data)
    while pos + 512 <= end:
        header = data[pos : pos + 512]
        if header.count(0) == 512:
            return records
        if header[156:157] not in (b"0", b"\0") or header[345:346] != b"\0":
            return None
        name = header[:100].split(b"\0", 1)[0].decode()
        size = int(header[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
        key, ext = name.split(".", 1) if "." in name else (name, "")
        if not records or records[-1]["__key__"] != key:
            records.append({"__key__": key})
        records[-1][ext] = data[pos + 512 : pos + 512 + size]
        pos += 512 + (size + 511) // 512 * 512
    return records if pos <= end else None


def read_shard(path: str | Path, image_size: int = 0, decode: bool = True) -> list[Sample]:
    """All samples of one shard, in stored order, images decoded (``decode=False``: when
    indexed; :func:`decode_record`). A shard is small: one is read at a time. ``path``: a local
    path or an fsspec URL (``s3://...``)."""
    data = read_bytes(path)
    records = _tar_records(data)
    if records is None:  # not a plain ustar (written by other tools): the standard reader
        records = []
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            for m in tar:
                if not m.isfile() or "." not in m.name.rsplit("/", 1)[-1]:
                    continue
                head, name = m.name.rsplit("/", 1) if "/" in m.name else ("", m.name)
                key, ext = name.split(".", 1)
                key = f"{head}/{key}" if head else key
                if not records or records[-1]["__key__"] != key:
                    records.append({"__key__": key})
                records[-1][ext] = tar.extractfile(m).read()
    return [decode_record(rec, image_size, decode) for rec in records]


def is_url(path: str | Path) -> bool:
    """Whether ``path`` names an object in storage (``s3://``, ``gs://``, ...): read by fsspec."""
    return "://" in str(path)


def read_bytes(path: str | Path) -> bytes:
    """The bytes of a local file or of an fsspec URL (credentials and endpoint from the
    environment only: ``AWS_*`` for S3, ``GOOGLE_APPLICATION_CREDENTIALS`` for GCS)."""
    if is_url(path):
        import fsspec

        with fsspec.open(str(path), "rb") as f:
            return f.read()
    return Path(path).read_bytes()


def join(root: str | Path, rel: str) -> str | Path:
    """``root/rel`` for a local folder (a Path) or a URL (a string); ``rel`` itself when it is
    a URL (a manifest row of shards in object storage)."""
    if is_url(rel):
        return rel
    return f"{str(root).rstrip('/')}/{rel}" if is_url(root) else Path(root) / rel


def sha256_file(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def split_of(key: str, val_fraction: float) -> str:
    """Stable split: a hash of the key, so adding data never moves a sample between splits."""
    u = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64
    return "val" if u < val_fraction else "train"


def read_manifest(shards_dir: str | Path) -> list[dict[str, Any]]:
    """The manifest's rows (local folder or URL)."""
    data = read_bytes(join(shards_dir, "manifest.parquet"))
    return pq.read_table(pa.BufferReader(data)).to_pylist()


def shard_paths(shards_dir: str | Path, split: str, kind: str) -> list[str | Path]:
    """The shards of one split and kind, in the manifest's order (Paths, or URLs when the
    shards lie in object storage)."""
    m = read_manifest(shards_dir)
    return [join(shards_dir, r["path"]) for r in m if r["split"] == split and r["kind"] == kind]


def load_info(shards: str | Path) -> dict[str, Any]:
    return json.loads(read_bytes(join(shards, "info.json")))


def text_floors(info_path: str | Path, field: str = "floor_nats_per_token") -> dict[str, float]:
    """The loss floor per text token of each kind (validation split, with the images) and their
    mean ``avg``, from an info.json; empty when the data's floor is unknown (real data).
    ``field``: another per-token total of info.json, e.g. ``image_value_nats_per_token``."""
    path = Path(info_path)
    if path.is_dir():
        path = path / "info.json"
    if not path.exists():
        return {}
    totals = json.loads(path.read_text()).get("totals", {})
    out = {
        k: totals[f"val/{k}"][field]
        for k in KINDS
        if totals.get(f"val/{k}", {}).get(field) is not None
    }
    if len(out) == len(KINDS):
        out["avg"] = sum(out.values()) / len(out)
    return out
