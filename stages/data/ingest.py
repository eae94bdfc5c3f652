"""Real data read where it lies: every sample checked and each bad one counted, in one pass.

Reads the formats public data comes in (see stages/data/corpus_format.py for the canonical ones):

- caption: img2dataset-style webdataset tars (``key.jpg|jpeg|png|webp``, ``key.txt``,
  optional ``key.json``);
- interleaved: OBELICS-style parquet, ``texts: list<string|null>`` and ``images: list<binary|
  null>`` aligned by position, optional ``key``/``id`` column (images may also be HF-datasets
  ``{"bytes", "path"}`` structs);
- text: DCLM-style JSON lines (``.jsonl``/``.json``, optionally ``.gz``/``.zst``/``.bz2``) with a
  ``text`` field, or parquet with a ``text`` column.

Nothing is copied and each input is read once. The corpus stage lists the inputs with their
size and version tag (:func:`list_inputs`); the shards stage reads each where it lies and, in
one pass, checks every sample, counts every skipped one under one of :data:`REASONS`,
tokenizes and shards the rest (:func:`corpus_parts`, :func:`part_docs`); its report sums the
counts (:func:`tally`), and a kind whose bad fraction exceeds ``max_bad_fraction`` raises
:class:`IngestError` after all kinds are processed, with the report kept. An input that changed
since it was listed is refused. The tokenizer reads a sample of the inputs through the same
checks; ``python -m stages.corpus --check`` counts without sharding (:func:`check_corpus`).
Images keep their source bytes; the shards stage resizes them.

Python's ``tarfile`` stops *silently* at a cut or garbled header in mid-archive, so the read
also checks that a tar's last member is followed by an end-of-archive block (in the same pass);
a tar without one counts as ``unreadable_file`` (the samples read before are kept). An error of
the store rather than the file (no permission, the network: :func:`store_trouble`) is not
counted: it fails the task, which runs again.
"""

from __future__ import annotations

import contextlib
import glob
import io
import json
import logging
import os
import re
import tarfile
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageFile

from stages.common.engine import run_tasks
from stages.common.inputs import StaleInput, require_set
from stages.data.corpus_format import (
    IMAGE_EXTS,
    META_EXT,
    TEXT_EXT,
    Doc,
    corpus_files,
    iter_docs,
    iter_tar_groups,
)
from stages.data.kinds import KINDS
from stages.data.shard_format import is_url
from stages.params import FilesCorpus

log = logging.getLogger(__name__)

REASONS: tuple[str, ...] = (
    "undecodable_image",  # PIL cannot identify it as PNG/JPEG/WebP, or cannot decode it
    "truncated_image",  # PIL's truncated-file error on a full load
    "oversized_image",  # a side > max_image_side (from the header), or a decompression bomb
    "undersized_image",  # a side < min_image_side
    "empty_text",  # empty or whitespace-only text
    "non_utf8_text",  # bytes that are not UTF-8 (or a lone surrogate from a JSON escape)
    "unpaired",  # caption image without .txt, or .txt without image
    "malformed_record",  # bad JSON line, missing/non-string text, misaligned interleaved row
    "unreadable_file",  # a file that cannot be opened or is cut short (counts 1 per file)
)
# Formats the canonical corpus can name (corpus_format.image_ext); others are refused.
PIL_FORMATS = ("PNG", "JPEG", "WEBP")
SUFFIXES: dict[str, tuple[str, ...]] = {
    "caption": (".tar", ".tar.gz", ".tgz"),
    "interleaved": (".parquet",),
    "text": tuple(
        f"{base}{comp}" for base in (".jsonl", ".json") for comp in ("", ".gz", ".zst", ".bz2")
    )
    + (".parquet",),
}
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
_MAX_KEY = 96
_BATCH_ROWS = 16  # parquet rows decoded at a time (interleaved rows can hold many images)
_CODECS = {".gz": "gzip", ".zst": "zstd", ".bz2": "bz2"}  # of JSON lines, by suffix


class IngestError(RuntimeError):
    """Bad input: a pattern with no files, or a kind with too many bad samples.

    ``report`` is the ingest report when one was made (threshold breach), else ``None``.
    """

    def __init__(self, message: str, report: dict | None = None):
        super().__init__(message)
        self.report = report


class _Unreadable(Exception):
    """A file that opens but is not what its kind needs (no column, no end of archive)."""


# What a cut or corrupt file raises while it is read; anything else is a bug and propagates.
READ_ERRORS = (OSError, EOFError, zlib.error, tarfile.TarError, pa.ArrowException, _Unreadable)


def store_trouble(e: BaseException) -> bool:
    """Whether ``e``, raised while reading an input, is the store's trouble rather than the
    file's: no permission, a connection or timeout, or any OS error with an errno (what s3fs and
    the OS raise). That propagates (the task fails, Ray runs it again) instead of counting the
    rest of the file as lost; a format error (a cut gzip, tar or parquet: no errno) counts."""
    return isinstance(e, (PermissionError, ConnectionError, TimeoutError)) or (
        isinstance(e, OSError) and e.errno is not None
    )


class _Bad(NamedTuple):
    reason: str
    where: str


@dataclass(frozen=True)
class _Checks:
    min_side: int
    max_side: int

    def image(self, data: Any) -> str | None:
        """The reason these encoded image bytes are refused, or None if they are fine."""
        if not isinstance(data, bytes | bytearray):
            return "malformed_record"
        try:
            with Image.open(io.BytesIO(data), formats=PIL_FORMATS) as im:
                w, h = im.size  # header only: nothing decoded yet
                if max(w, h) > self.max_side:
                    return "oversized_image"
                if min(w, h) < self.min_side:
                    return "undersized_image"
                im.load()
        except Image.DecompressionBombError:
            return "oversized_image"
        except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
            return "truncated_image" if "truncated" in str(e).lower() else "undecodable_image"
        return None

    @staticmethod
    def text(value: Any) -> tuple[str | None, str]:
        """(reason, decoded text): reason is None when the text is fine."""
        if isinstance(value, bytes | bytearray):
            try:
                value = bytes(value).decode("utf-8")
            except UnicodeDecodeError:
                return "non_utf8_text", ""
        if not isinstance(value, str):
            return "malformed_record", ""
        try:
            value.encode("utf-8")  # a lone surrogate ("\ud800" in JSON) cannot be written
        except UnicodeEncodeError:
            return "non_utf8_text", ""
        if not value.strip():
            return "empty_text", ""
        return None, value


class _Keys:
    """Canonical keys of one file: ``{kind}-{file:05d}-{source key}``, unique, no '.' or '/'."""

    def __init__(self, kind: str, file_index: int):
        self.prefix, self.seen = f"{kind}-{file_index:05d}-", set()

    def __call__(self, source_key: str) -> str:
        base = self.prefix + (_KEY_UNSAFE.sub("_", source_key)[:_MAX_KEY] or "_")
        key, n = base, 1
        while key in self.seen:  # a repeated or sanitised-alike source key
            n += 1
            key = f"{base}-{n}"
        self.seen.add(key)
        return key


def _meta(path: str, where: Any) -> dict[str, Any]:
    return {"source": f"{path}:{where}", "entropy_nats": None}


# ---------------------------------------------------------------------------------- readers
# Each yields a Doc or a _Bad per sample, and raises one of READ_ERRORS if the file is cut.


@contextlib.contextmanager
def open_input(path: str) -> Iterator[BinaryIO]:
    """A binary file of a local path or a URL of any fsspec protocol (credentials and endpoint
    from the environment only: ``AWS_*`` for S3, ``GOOGLE_APPLICATION_CREDENTIALS`` for GCS)."""
    if is_url(path):
        import fsspec

        with fsspec.open(path, "rb") as f:
            yield f
    else:
        with open(path, "rb") as f:
            yield f


def _read_caption(path: str, file_index: int, check: _Checks) -> Iterator[Doc | _Bad]:
    with open_input(path) as f:
        yield from _read_caption_file(f, path, file_index, check)


def _read_caption_file(f: BinaryIO, path: str, file_index: int, check: _Checks):
    keys = _Keys("caption", file_index)
    end: dict[str, bool] = {}
    for src_key, group in iter_tar_groups(f, end):
        where = f"{path}:{src_key}"
        ext = next((e for e in IMAGE_EXTS if e in group), None)
        if ext is None or TEXT_EXT not in group:
            yield _Bad("unpaired", where)
            continue
        reason, text = check.text(group[TEXT_EXT])
        reason = reason or check.image(group[ext])
        if reason:
            yield _Bad(reason, where)
            continue
        meta = _meta(path, src_key)
        if META_EXT in group:
            with contextlib.suppress(ValueError, RecursionError):
                meta["orig"] = json.loads(group[META_EXT])
        yield Doc.caption(keys(src_key), group[ext], text, meta)
    if not end.get("whole"):
        raise _Unreadable("no end-of-archive block after the last member (cut or garbled)")


def _binary(t: pa.DataType) -> pa.DataType:
    """The same type with strings as binary: we decode UTF-8 per value, not per file."""
    if pa.types.is_string(t):
        return pa.binary()
    if pa.types.is_large_string(t):
        return pa.large_binary()
    if pa.types.is_list(t):
        return pa.list_(_binary(t.value_type))
    if pa.types.is_large_list(t):
        return pa.large_list(_binary(t.value_type))
    return t


def _parquet_rows(path: str, need: list[str], optional: list[str]) -> Iterator[dict[str, Any]]:
    with open_input(path) as f:
        yield from _parquet_file_rows(pq.ParquetFile(f), need, optional)


def _parquet_file_rows(
    pf: pq.ParquetFile, need: list[str], optional: list[str]
) -> Iterator[dict[str, Any]]:
    names = pf.schema_arrow.names
    missing = [c for c in need if c not in names]
    if missing:
        raise _Unreadable(f"no column {missing} (columns: {names})")
    cols = need + [c for c in optional if c in names][:1]
    for batch in pf.iter_batches(batch_size=_BATCH_ROWS, columns=cols):
        data = {c: batch.column(c) for c in cols}
        data = {c: a.cast(_binary(a.type)).to_pylist() for c, a in data.items()}
        for i in range(batch.num_rows):
            yield {c: v[i] for c, v in data.items()}


def _read_interleaved(path: str, file_index: int, check: _Checks) -> Iterator[Doc | _Bad]:
    keys = _Keys("interleaved", file_index)
    for row_index, row in enumerate(_parquet_rows(path, ["texts", "images"], ["key", "id"])):
        key = row.get("key", row.get("id"))
        src_key = f"{row_index:08d}" if key is None else _as_str(key)
        where = f"{path}:{src_key}"
        reason, texts, images = _check_row(row["texts"], row["images"], check)
        if reason:
            yield _Bad(reason, where)
        else:
            yield Doc(keys(src_key), "interleaved", texts, images, _meta(path, src_key))


def _as_str(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _check_row(
    texts: Any, images: Any, check: _Checks
) -> tuple[str | None, list[str | None], list[bytes | None]]:
    """Validate one OBELICS row; the first failure names the reason for the whole row."""
    if not isinstance(texts, list) or not isinstance(images, list) or len(texts) != len(images):
        return "malformed_record", [], []
    images = [im.get("bytes") if isinstance(im, dict) else im for im in images]  # HF Image
    if any((t is None) == (im is None) for t, im in zip(texts, images, strict=True)):
        return "malformed_record", [], []
    if all(t is None for t in texts) or all(im is None for im in images):
        return "malformed_record", [], []
    out_texts: list[str | None] = []
    for t, im in zip(texts, images, strict=True):
        if t is not None:
            reason, text = check.text(t)
            out_texts.append(text)
        else:
            reason = check.image(im)
            out_texts.append(None)
        if reason:
            return reason, [], []
    return None, out_texts, [None if im is None else bytes(im) for im in images]


def _read_text(path: str, file_index: int, check: _Checks) -> Iterator[Doc | _Bad]:
    keys = _Keys("text", file_index)
    if path.endswith(".parquet"):  # rows numbered from 0
        numbered = enumerate((r["text"] for r in _parquet_rows(path, ["text"], [])), 0)
        records = ((n, value, None) for n, value in numbered)
    else:  # lines numbered from 1
        records = _jsonl_records(path)
    for n, value, reason in records:
        where = f"{path}:{n}"
        if reason is None:
            reason, value = check.text(value)
        if reason:
            yield _Bad(reason, where)
        else:
            yield Doc.text_only(keys(f"{n:08d}"), value, _meta(path, n))


def _jsonl_records(path: str) -> Iterator[tuple[int, Any, str | None]]:
    """(line number, text value, reason) per non-blank line; decoded line by line."""
    codec = next((c for suffix, c in _CODECS.items() if path.endswith(suffix)), None)
    with (
        open_input(path) as raw,
        pa.input_stream(raw, compression=codec) as stream,
        io.BufferedReader(stream) as f,
    ):
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue  # a blank line is no record
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                yield n, None, "non_utf8_text"
                continue
            try:
                rec = json.loads(line)
            except (ValueError, RecursionError):
                yield n, None, "malformed_record"
                continue
            if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                yield n, None, "malformed_record"
                continue
            yield n, rec["text"], None


READERS = {"caption": _read_caption, "interleaved": _read_interleaved, "text": _read_text}


# ---------------------------------------------------------------------------------- driver


def _expand_url(pattern: str, key: str, infos: dict[str, dict[str, Any]]) -> list[str]:
    """The objects a URL or URL glob names (``s3://bucket/caps/*.tar``), as sorted URLs; their
    listing entries (size, ETag) into ``infos`` by URL."""
    import fsspec

    try:
        fs, root = fsspec.core.url_to_fs(pattern)
        if glob.has_magic(root):
            found = {p: i for p, i in fs.glob(root, detail=True).items() if i.get("type") == "file"}
        else:
            found = {root: fs.info(root)} if fs.isfile(root) else {}
    except (ImportError, ValueError) as e:  # an unknown protocol, or its package missing
        raise IngestError(f"{key}: {pattern!r}: {e}") from None
    except Exception as e:  # noqa: BLE001 (credentials, endpoint, permissions: the store's words)
        raise IngestError(
            f"{key}: cannot list {pattern!r} ({type(e).__name__}: {e}); credentials and endpoint "
            "come from the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, "
            "AWS_ENDPOINT_URL for S3)"
        ) from None
    urls = []
    for p in sorted(found):
        urls.append(fs.unstrip_protocol(p))
        infos[urls[-1]] = found[p]
    return urls


def expand(
    patterns: list[str], kind: str, infos: dict[str, dict[str, Any]] | None = None
) -> list[str]:
    """Files matched by ``patterns`` (paths or recursive globs, or URLs and URL globs of any
    fsspec protocol such as ``s3://bucket/caps/*.tar``): sorted per pattern, deduped. A URL's
    listing entry goes into ``infos`` when given.

    Raises IngestError naming a pattern that matches no file, or a file of an unknown format.
    """
    files: list[str] = []
    for i, pattern in enumerate(patterns):
        require_set(f"corpus.files.{kind}[{i}]", pattern)
        if is_url(pattern):
            matches = _expand_url(
                pattern, f"corpus.files.{kind}[{i}]", {} if infos is None else infos
            )
        else:
            pat = os.path.expanduser(pattern)
            matches = sorted(p for p in glob.glob(pat, recursive=True) if os.path.isfile(p))
            if not matches and os.path.isfile(pat):  # a literal name with glob characters
                matches = [pat]
        if not matches:
            raise IngestError(f"corpus.files.{kind}: pattern {pattern!r} matches no files")
        for m in matches:
            if not m.lower().endswith(SUFFIXES[kind]):
                raise IngestError(
                    f"corpus.files.{kind}: {m!r} (from {pattern!r}) is not one of "
                    f"{', '.join(SUFFIXES[kind])}"
                )
            if m not in files:
                files.append(m)
    return files


@contextlib.contextmanager
def _strict_pil() -> Iterator[None]:
    """A truncated image must fail to load, whatever another module set globally."""
    saved = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = saved


def fingerprint(path: str, info: dict[str, Any] | None = None) -> dict[str, Any]:
    """What names this version of an input, read without its bytes: its size and its store's
    version tag (an object's ETag or generation, a local file's modification time). ``info``:
    the store's listing entry for a URL, when one is at hand (saves a request per object)."""
    if is_url(path):
        if info is None:
            import fsspec

            fs, inner = fsspec.core.url_to_fs(path)
            info = fs.info(inner)
        tags = ("ETag", "etag", "generation", "md5Hash", "LastModified", "mtime")
        version = next((str(info[k]) for k in tags if info.get(k) is not None), None)
        size = info.get("size")
    else:
        st = os.stat(path)
        size, version = st.st_size, str(st.st_mtime_ns)
    return {"path": path, "size": None if size is None else int(size), "version": version}


def list_inputs(files: FilesCorpus) -> dict[str, Any]:
    """The corpus stage on real data: every input file named, with its fingerprint, and the
    checks its samples must pass; no sample is read here and nothing is copied. The shards stage
    reads each input once, where it lies, and checks, counts, tokenizes and shards in that one
    pass (:func:`corpus_parts`, :func:`part_docs`, :func:`tally`).

    Raises :class:`IngestError` naming a pattern that matches no file, or a file of an unknown
    format, before any work.
    """
    infos: dict[str, dict[str, Any]] = {}
    paths = {kind: expand(getattr(files, kind), kind, infos) for kind in KINDS}
    kinds = {}
    for kind in KINDS:
        inputs = [fingerprint(p, infos.get(p)) for p in paths[kind]]
        size = sum(r["size"] or 0 for r in inputs)
        log.info("inputs %s: %d files, %.1f MB", kind, len(inputs), size / 1e6)
        kinds[kind] = {"files": paths[kind], "bytes": size, "inputs": inputs}
    return {
        "source": "files",
        "checks": {"min_side": files.min_image_side, "max_side": files.max_image_side},
        "max_bad_fraction": files.max_bad_fraction,
        "kinds": kinds,
    }


def checked_docs(
    kind: str, file_index: int, path: str, check: _Checks, bad: Counter[str]
) -> Iterator[Doc]:
    """The valid samples of input file ``path`` (the ``file_index``-th of its kind), in file
    order; each skipped one counted in ``bad`` by reason (a file cut short counts once as
    ``unreadable_file``, the samples read before the cut are kept)."""
    with _strict_pil():
        items = READERS[kind](path, file_index, check)
        while True:
            try:
                item = next(items)
            except StopIteration:
                return
            except READ_ERRORS as e:
                if store_trouble(e):
                    raise
                log.warning("%s: unreadable file %s: %s", kind, path, e)
                bad["unreadable_file"] += 1
                return
            if isinstance(item, _Bad):
                log.debug("%s: skip %s: %s", kind, item.where, item.reason)
                bad[item.reason] += 1
            else:
                yield item


@dataclass(frozen=True)
class Part:
    """What one task reads of the corpus: a canonical corpus file (generated data), or an input
    file read where it lies through the checks (real data: never copied). ``recorded``: the
    corpus stage's fingerprint of the input, checked again before it is read."""

    kind: str
    index: int
    path: str
    recorded: dict[str, Any] | None = None
    check: _Checks | None = None


def corpus_report(corpus: str | Path) -> dict[str, Any]:
    """The corpus stage's ``report.json`` in ``corpus``; one made by an older corpus stage (which
    copied real data) is refused, naming the rerun."""
    report = json.loads((Path(corpus) / "report.json").read_text())
    if report.get("source") == "files" and "checks" not in report:
        raise StaleInput(
            f"{corpus}/report.json was made by an older corpus stage (a copy of the data); "
            "rerun it: `dvc repro corpus`"
        )
    return report


def corpus_parts(corpus: str | Path, kind: str) -> list[Part]:
    """The parts of one kind of the corpus in ``corpus`` (a corpus stage's output), in order."""
    report = corpus_report(corpus)
    if report["source"] != "files":
        return [Part(kind, i, str(p)) for i, p in enumerate(corpus_files(Path(corpus), kind))]
    check = _Checks(**report["checks"])
    inputs = report["kinds"][kind]["inputs"]
    return [Part(kind, i, row["path"], row, check) for i, row in enumerate(inputs)]


def part_docs(part: Part, bad: Counter[str] | None = None) -> Iterator[Doc]:
    """The documents of one part; an input's skipped samples counted in ``bad`` by reason. An
    input must still be the file the corpus stage listed (the same size and version tag), else
    :class:`StaleInput`: nothing made from another version is passed off as current."""
    if part.recorded is None:
        path = Path(part.path)
        yield from iter_docs(path.parent.parent, part.kind, [path])
        return
    rec = part.recorded
    try:
        now = fingerprint(part.path)
    except FileNotFoundError:
        raise StaleInput(
            f"{part.path} no longer exists (the corpus stage listed it); rerun it: "
            "`dvc repro --force corpus`, then `dvc repro`"
        ) from None
    if (now["size"], now["version"]) != (rec["size"], rec["version"]):
        raise StaleInput(
            f"{part.path} changed since the corpus stage listed it (size {rec['size']} -> "
            f"{now['size']}, version {rec['version']} -> {now['version']}); rerun it: "
            "`dvc repro --force corpus`, then `dvc repro`"
        )
    yield from checked_docs(part.kind, part.index, part.path, part.check,
                            Counter() if bad is None else bad)  # fmt: skip


def check_part(part: Part) -> dict[str, Any]:
    """One task of a check pass: every sample of one part checked and counted, nothing kept."""
    bad: Counter[str] = Counter()
    kept = sum(1 for _ in part_docs(part, bad))
    return {"kept": kept, "bad": dict(sorted(bad.items()))}


def _named(part: Part, corpus: str | Path) -> str:
    """An input as the corpus stage listed it (the path or URL it is read from); a corpus file
    relative to the corpus (the report is the same wherever the repository lies)."""
    if part.recorded is not None:
        return part.path
    return Path(part.path).relative_to(Path(corpus)).as_posix()


def tally(corpus: str | Path, parts: list[Part], counts: list[dict[str, Any]]) -> dict[str, Any]:
    """The samples report of a pass over the corpus in ``corpus``: per kind, samples read and
    kept, every skipped one counted by reason (summed over the parts' tasks, so it does not
    depend on the engine or the workers), and per part its counts; ``breaches``, the kinds whose
    bad fraction exceeds the corpus's ``max_bad_fraction`` (see :func:`check_threshold`)."""
    source = corpus_report(corpus)
    limit = source.get("max_bad_fraction")
    kinds: dict[str, Any] = {}
    breaches = []
    for kind in KINDS:
        rows = [{"path": _named(p, corpus), **c}
                for p, c in zip(parts, counts, strict=True) if p.kind == kind]  # fmt: skip
        bad: Counter[str] = Counter()
        for r in rows:
            bad.update(r["bad"])
        kept = sum(r["kept"] for r in rows)
        read = kept + sum(bad.values())
        fraction = sum(bad.values()) / read if read else 0.0
        summary = ", ".join(f"{r}={n}" for r, n in sorted(bad.items())) or "none"
        log.info(
            "samples %s: %d files, read %d, kept %d, bad %.2f%% (%s)",
            *(kind, len(rows), read, kept, 100 * fraction, summary),
        )
        if rows and kept == 0:
            log.warning("samples %s: no valid sample in %d files", kind, len(rows))
        if limit is not None and fraction > limit:
            breaches.append(
                f"{kind}: bad fraction {fraction:.4f} > max_bad_fraction {limit:g} (read "
                f"{read}, kept {kept}; {summary})"
            )
        kinds[kind] = {
            "read": read,
            "kept": kept,
            "bad": dict(sorted(bad.items())),
            "bad_fraction": round(fraction, 6),
            "parts": rows,
        }
    return {
        "source": source["source"],
        "max_bad_fraction": limit,
        "kinds": kinds,
        "breaches": breaches,
    }


def check_threshold(report: dict[str, Any]) -> None:
    """Raise :class:`IngestError` (with the report) if a kind had too many bad samples."""
    if report["breaches"]:
        raise IngestError("too many bad samples: " + "; ".join(report["breaches"]), report)


def check_corpus(
    corpus: str | Path,
    workers: int | None = None,
    engine: str = "local",
    address: str | None = None,
) -> dict[str, Any]:
    """A check pass (``python -m stages.corpus --check``): every sample of the corpus read
    through the checks and counted, one task per part (``engine``: stages/common/engine.py),
    nothing written; the shards stage counts the same in its own pass. Returns the samples
    report (:func:`tally`), raises :class:`IngestError` on a breach."""
    parts = [part for kind in KINDS for part in corpus_parts(corpus, kind)]
    counts = run_tasks(check_part, [(p,) for p in parts], engine, address, workers, desc="check")
    report = tally(corpus, parts, counts)
    check_threshold(report)
    return report
