"""Where a point's checkpoints live, how they are written, and which one a resume reads.

A *slot* is one named checkpoint of a point or of a group (``latest``, ``trunk-latest``,
``branch-00000040``, ``trunk-replay-00000040``) in a folder of the checkpoint store
(``train.checkpoint_store``: the grid's results folder by default, or any fsspec URL such as
``s3://bucket/prefix`` or a shared filesystem; credentials and endpoint come from the
environment only, e.g. ``AWS_ACCESS_KEY_ID`` and ``AWS_ENDPOINT_URL``). Each save writes a new
*version* of the slot named by its step (``latest@00000050``) and commits it last; the slot
keeps its two newest committed versions. Nothing is renamed in place, so an object store works
as a shared filesystem does, and a kill mid-write leaves an uncommitted version that is never
read.

Two formats (``train.checkpoint_format``), both resumable at any process count, sharded or not:

- ``full``: one file ``<slot>@<step>.pt`` (``torch.save``) with the model and optimizer state
  gathered to rank 0, which writes it (a temporary name, then renamed: the rename commits).
- ``sharded``: a folder ``<slot>@<step>/`` written by ``torch.distributed.checkpoint`` (DCP),
  every rank its own shards in parallel, then ``state.pt`` (loader, counters, code fingerprint)
  by rank 0: its presence commits the version. DCP reshards on load, so a checkpoint of 2 FSDP
  ranks loads into one plain process and the other way round. With ``train.checkpoint_async``
  the shards are copied in memory at the save and written while training goes on (on a
  process group of their own); the commit waits for the writes, at the next save, load or end.

A version that does not read (its file truncated by a disk or copy fault; a shard missing or
shorter than the metadata says) is set aside as ``<version>.corrupt`` (kept for a look, never
read again) and the version before it is read instead (:meth:`Slot.resumable`). A store that
cannot be reached (the network, credentials, permissions) condemns nothing: its error
propagates, the point fails this attempt and its retry finds the versions as they were. Rank 0
reads the store and decides for every rank; an error there raises on every rank.
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import pickle
import re
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import torch

from flows.training import dist
from stages.common.inputs import require_set

log = logging.getLogger(__name__)

STATE = "state.pt"  # in a sharded version: loader, counters, code; written last (the commit)
KEEP = 2  # committed versions a slot keeps: the newest and the one before


class Store:
    """A folder of checkpoints: a local path or an fsspec URL."""

    def __init__(self, url: str | Path):
        self.url = str(url).rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.url)

    def __truediv__(self, name: str) -> Store:
        return Store(f"{self.url}/{name}")

    def __repr__(self) -> str:
        return self.url

    @property
    def local(self) -> bool:
        return "file" in self.fs.protocol or "local" in self.fs.protocol

    def entries(self) -> dict[str, dict[str, Any]]:
        """The folder's entries by name (``size``, ``type``), read fresh (no cached listing)."""
        self.fs.invalidate_cache(self.root)
        try:
            found = self.fs.ls(self.root, detail=True)
        except FileNotFoundError:
            return {}
        return {e["name"].rstrip("/").rsplit("/", 1)[-1]: e for e in found}

    def slot_names(self) -> set[str]:
        """The names of the slots with any version here (committed or not)."""
        return {m["slot"] for n in self.entries() if (m := VERSION.match(n.removesuffix(".tmp")))}

    def write(self, name: str, data: bytes) -> None:
        """``data`` as ``name``, whole or not at all: a temporary name, then a rename (on an
        object store a put is already whole)."""
        path = f"{self.root}/{name}"
        if not self.local:
            self.fs.pipe_file(path, data)
            return
        self.fs.makedirs(self.root, exist_ok=True)
        self.fs.pipe_file(path + ".tmp", data)
        self.fs.mv(path + ".tmp", path)

    def read(self, name: str) -> bytes:
        return self.fs.cat_file(f"{self.root}/{name}")

    def remove(self, name: str) -> None:
        path = f"{self.root}/{name}"
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)

    def set_aside(self, name: str) -> None:
        """Rename ``name`` (a file or a folder) to ``name.corrupt``: on an object store each
        object is copied, then the originals deleted."""
        src, dst = f"{self.root}/{name}", f"{self.root}/{name}.corrupt"
        if self.local:
            self.fs.mv(src, dst, recursive=True)
            return
        for obj in self.fs.find(src):
            self.fs.copy(obj, dst + obj[len(src) :])
        self.fs.rm(src, recursive=True)


class CorruptCheckpoint(ValueError):
    """A checkpoint file that is not whole (torch's zip reader found it cut or garbled)."""


@contextlib.contextmanager
def _whole(what: Any) -> Iterator[None]:
    """torch.load's errors for a cut or garbled file as :class:`CorruptCheckpoint`; any other
    error (memory, the store's client) as it came."""
    try:
        yield
    except RuntimeError as e:
        if "PytorchStreamReader" not in str(e):
            raise
        raise CorruptCheckpoint(f"{what} is not a whole checkpoint: {e}") from e
    except OSError as e:  # a local file cut short: the zip reader seeks before its start
        if e.errno != errno.EINVAL:
            raise
        raise CorruptCheckpoint(f"{what} is not a whole checkpoint: {e}") from e


def load_state(data: bytes | str | Path) -> dict[str, Any]:
    source = io.BytesIO(data) if isinstance(data, bytes) else data
    with _whole("a checkpoint's state" if isinstance(data, bytes) else data):
        return torch.load(source, map_location="cpu", weights_only=True)


# What a version that does not read whole raises: a cut zip or pickle (CorruptCheckpoint, a
# ValueError; EOFError, UnpicklingError), a short or missing piece of a committed version
# (ValueError from Version.check, FileNotFoundError), keys absent. Anything else (OSError, a
# connection or credentials error of the store's client, memory) is not the version's fault.
UNREADABLE = (EOFError, ValueError, KeyError, pickle.UnpicklingError, zipfile.BadZipFile,
              FileNotFoundError)  # fmt: skip


@dataclass(frozen=True)
class Version:
    """One committed save of a slot."""

    store: Store  # the slot's folder
    name: str  # ``<slot>@<step>`` (+ ``.pt``: full)
    step: int

    @property
    def sharded(self) -> bool:
        return not self.name.endswith(".pt")

    @property
    def url(self) -> str:
        return f"{self.store.url}/{self.name}"

    def state(self) -> dict[str, Any]:
        """Its loader, counters and code (and, for a full version, the model and optimizer)."""
        if self.sharded:
            return load_state(self.store.read(f"{self.name}/{STATE}"))
        if self.store.local:  # (mmap: the tensors are not read until used)
            path = Path(self.store.root) / self.name
            with _whole(path):
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return load_state(self.store.read(self.name))

    def meta(self) -> tuple[str | None, int]:
        """(code fingerprint, step); the fingerprint is None where none was recorded."""
        state = self.state()
        return (state.get("code") or {}).get("fingerprint"), int(state["counters"]["step"])

    def check(self) -> None:
        """Raise if it does not read whole: its state, and for a sharded version DCP's metadata
        and every shard as long as the metadata says (without reading the tensors)."""
        if int(self.state()["counters"]["step"]) != self.step:
            raise ValueError(f"its counters say another step than {self.step}")
        if not self.sharded:
            return
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

        meta = FsspecReader(self.url).read_metadata()
        files = (self.store / self.name).entries()
        need: dict[str, int] = {}
        for info in meta.storage_data.values():
            need[info.relative_path] = max(
                need.get(info.relative_path, 0), info.offset + info.length
            )
        for rel, size in need.items():
            have = files.get(rel, {}).get("size")
            if have is None or have < size:
                raise ValueError(f"shard {rel} holds {have} bytes of {size}")


VERSION = re.compile(r"^(?P<slot>.+)@(?P<step>\d{8})(?P<pt>\.pt)?$")


@dataclass(frozen=True)
class Slot:
    """One named checkpoint in a folder of the store (the module docstring)."""

    store: Store
    name: str

    def version_name(self, step: int, sharded: bool) -> str:
        return f"{self.name}@{step:08d}" + ("" if sharded else ".pt")

    def _versions(self) -> tuple[list[Version], list[str]]:
        """(committed versions newest first, names of the slot's other entries: uncommitted
        versions and temporary files), read on this rank."""
        committed, other = [], []
        for name, entry in self.store.entries().items():
            m = VERSION.match(name.removesuffix(".tmp"))
            if m is None or m["slot"] != self.name:
                continue
            sharded = m["pt"] is None
            done = not name.endswith(".tmp") and (
                (sharded and entry["type"] == "directory" and self._committed(name))
                or (not sharded and entry["type"] == "file")
            )
            if done:
                committed.append(Version(self.store, name, int(m["step"])))
            else:
                other.append(name)
        return sorted(committed, key=lambda v: -v.step), other

    def _committed(self, name: str) -> bool:
        return STATE in (self.store / name).entries()

    def versions(self) -> list[Version]:
        return self._versions()[0]

    def exists(self) -> bool:
        """Whether it has a committed version (rank 0 looks; every rank gets its answer)."""
        return dist.on_writer(lambda: bool(self.versions()))

    def resumable(self) -> Version | None:
        """The newest version that reads whole (:meth:`newest_readable`), as rank 0 finds it,
        on every rank; None: start over."""

        def find() -> tuple[str, int] | None:
            chosen = self.newest_readable()
            return None if chosen is None else (chosen.name, chosen.step)

        found = dist.on_writer(find)
        return None if found is None else Version(self.store, found[0], found[1])

    def newest_readable(self) -> Version | None:
        """The newest version that reads whole (:meth:`Version.check`), read on this rank;
        those that do not (:data:`UNREADABLE`) are set aside as ``.corrupt`` and logged; any
        other error (the store unreachable) propagates and sets nothing aside. Training is
        deterministic from any checkpoint, so resuming from an earlier one ends with the same
        numbers."""
        for i, v in enumerate(self.versions()):
            try:
                v.check()
            except UNREADABLE as e:
                self.store.set_aside(v.name)
                log.warning("%s does not read (%s): set aside as %s.corrupt", v.url, str(e)[:200],
                            v.name)  # fmt: skip
                continue
            if i:
                log.warning("%s: resuming from the checkpoint before, %s", self, v.name)
            return v
        return None

    def clear(self) -> None:
        """Delete every version (rank 0), committed or not."""
        if dist.writer():
            committed, other = self._versions()
            for name in [v.name for v in committed] + other:
                self.store.remove(name)

    def prune(self, keep: int = KEEP) -> None:
        """Delete all but the ``keep`` newest committed versions and any uncommitted one
        (called by rank 0 after a commit, when no other save of the slot is under way)."""
        committed, other = self._versions()
        for name in [v.name for v in committed[keep:]] + other:
            self.store.remove(name)

    def __repr__(self) -> str:
        return f"{self.store.url}/{self.name}"


def checkpoint_store(configured: str | None, workdir: Path) -> Store:
    """The store's root: ``train.checkpoint_store`` if set, else the grid's results folder
    (a study file's ``<...>`` placeholder is refused, naming the key)."""
    require_set("train.checkpoint_store", configured)
    return Store(configured or workdir)
