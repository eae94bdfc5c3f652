"""The training loader: streams shards, samples kinds by the mixture, packs rows, yields batches.

Reads only what stages/data/shard_format.py defines. Each row of a batch is filled from ONE data
kind, drawn with the mixture probabilities (45-45-10 by default), so the mixture is the share of
rows, i.e. of training tokens, per kind. Documents are packed back to back; a document longer
than the space left continues in the next row of its kind, but an image is never cut: if its
``<boi> <image>×T <eoi>`` span would cross the end of the row, the row is padded and the span
starts the next one. Consecutive rows of a kind overlap by one token, so no target is lost.

Determinism and resume: the kinds of step ``s`` come from ``rng([seed, s])``; each kind's stream
visits its shards in an order drawn per epoch and the samples of a shard in an order drawn per
(epoch, shard). The loader's whole state is therefore the step and, per kind, (epoch, shard,
sample, token offset): :meth:`PackedLoader.state_dict` saves it and ``start_step`` or
:meth:`PackedLoader.load_state_dict` resume exactly where a run stopped.

Ranks: every rank packs every row of the global batch (token ids only: cheap), so every
stream's state is the one-process state, and collates only its own rows (``rows``), whose
images alone it decodes; :attr:`PackedLoader.totals` counts the whole global batch (rows, text
targets, images) for the loss scale and the counters.

Reading: shards are local paths or URLs (``s3://...``: read by fsspec). A shard is read either
in the training process when it is needed (``workers=0``; its images are then decoded when a
row takes them) or, ahead of use, by ``workers`` background processes that also decode its
images (:class:`ShardReader`): each stream asks for its next ``prefetch`` shards in the order it
will visit them, so the batches are the same either way; :attr:`PackedLoader.wait_s` is the
time the loader waited for a shard.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stages.data.kinds import KINDS
from stages.data.shard_format import NON_TARGET, Sample, load_info, read_shard, shard_paths


@dataclass
class Batch:
    """One training batch. B rows of L positions; M images in the whole batch."""

    tokens: torch.Tensor  # (B, L) int64 input ids; image positions hold the <image> id
    targets: torch.Tensor  # (B, L) int64 next-token ids
    loss_mask: torch.Tensor  # (B, L) float32: 1 where the target is text of the same document
    doc_ids: torch.Tensor  # (B, L) int64: segment of each position; attention stays inside one
    positions: torch.Tensor  # (B, L) int64: position inside its segment (restarts at 0)
    images: torch.Tensor  # (M, 3, S, S) uint8
    image_index: torch.Tensor  # (M, 2) int64: (row, position of the image's first token)
    kinds: torch.Tensor  # (B,) int64: index into KINDS of each row
    target_tags: torch.Tensor  # (B, L) int64: word tag of each target (rank * 4 + role; 0: none)

    def rows(self, start: int, stop: int) -> Batch:
        """Rows [start, stop) with their images (one rank's share of a global batch); all of
        them: the batch itself."""
        if (start, stop) == (0, self.tokens.shape[0]):
            return self
        keep = (self.image_index[:, 0] >= start) & (self.image_index[:, 0] < stop)
        index = self.image_index[keep].clone()
        index[:, 0] -= start
        per_row = {f.name: getattr(self, f.name)[start:stop] for f in fields(self)
                   if f.name not in ("images", "image_index")}  # fmt: skip
        return Batch(**per_row, images=self.images[keep], image_index=index)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return Batch(
            **{
                f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
                for f in fields(self)
            }
        )


@dataclass(frozen=True)
class Totals:
    """What a whole global batch holds (a rank's batch is a part of it)."""

    rows: int
    targets: int  # text targets (the loss mask's ones)
    images: int


@dataclass
class StreamState:
    epoch: int = 0
    shard: int = 0  # position in this epoch's shard order
    sample: int = 0  # position in this shard's sample order
    offset: int = 0  # tokens of the current document already used


def _exit_with_parent(parent: int) -> None:
    """(In a reader process) end when the training process is gone, even killed with -9."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, daemon=True).start()


class ShardReader:
    """Reads shards and decodes their images: in the caller (``workers=0``) or ahead of use in
    ``workers`` processes (spawned: safe beside torch threads and process groups)."""

    def __init__(self, image_size: int, workers: int = 0):
        self.image_size = image_size
        self.pool: ProcessPoolExecutor | None = None
        if workers:
            ctx = mp.get_context("spawn")
            self.pool = ProcessPoolExecutor(
                workers, mp_context=ctx, initializer=_exit_with_parent, initargs=(os.getpid(),)
            )
        self.pending: dict[str | Path, Future] = {}
        self.wait_s = 0.0  # time the caller waited for a shard (read and decoded in it or not)

    def ahead(self, path: str | Path) -> None:
        """Start reading ``path`` in a worker (no-op without workers or if already started)."""
        if self.pool is not None and path not in self.pending:
            self.pending[path] = self.pool.submit(read_shard, path, self.image_size)

    def read(self, path: str | Path) -> list[Sample]:
        t0 = time.perf_counter()
        if self.pool is None:  # (images decoded when a row takes them)
            samples = read_shard(path, self.image_size, decode=False)
        else:
            self.ahead(path)
            samples = self.pending.pop(path).result()
        self.wait_s += time.perf_counter() - t0
        return samples

    def close(self) -> None:
        if self.pool is not None:
            for f in self.pending.values():
                f.cancel()
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool, self.pending = None, {}


class KindStream:
    """The documents of one kind in a seeded order, one shard in memory at a time (the next
    ``prefetch`` being read ahead when the reader has workers)."""

    def __init__(
        self,
        shards: list[str | Path],
        seed: int,
        kind_index: int,
        repeat: bool,
        shuffle: bool,
        reader: ShardReader,
        prefetch: int = 0,
    ):
        self.shards, self.seed, self.kind_index = shards, seed, kind_index
        self.repeat, self.shuffle = repeat, shuffle
        self.reader, self.prefetch = reader, prefetch
        self.state = StreamState()
        self._loaded: tuple[int, int] | None = None  # (epoch, shard) held in _samples
        self._samples: list[Sample] = []

    def _order(self, n: int, *key: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, self.kind_index, *key]).permutation(n)

    def current(self) -> Sample | None:
        """The document at the stream's position (None when a non-repeating stream ends)."""
        st = self.state
        while True:
            if st.shard >= len(self.shards):
                if not self.repeat or not self.shards:
                    return None
                st.epoch, st.shard, st.sample, st.offset = st.epoch + 1, 0, 0, 0
            if self._loaded != (st.epoch, st.shard):
                samples = self.reader.read(self._path(st.epoch, st.shard))
                for e, k in self._after(st.epoch, st.shard, self.prefetch):
                    self.reader.ahead(self._path(e, k))
                order = self._order(len(samples), st.epoch, st.shard)
                self._samples = [samples[i] for i in order]
                self._loaded = (st.epoch, st.shard)
            if st.sample < len(self._samples):
                return self._samples[st.sample]
            st.shard, st.sample, st.offset = st.shard + 1, 0, 0

    def _path(self, epoch: int, shard: int) -> str | Path:
        return self.shards[self._order(len(self.shards), epoch)[shard]]

    def _after(self, epoch: int, shard: int, n: int) -> list[tuple[int, int]]:
        """The (epoch, position) of the ``n`` shards this stream visits after this one."""
        out = []
        while len(out) < n:
            shard += 1
            if shard >= len(self.shards):
                if not self.repeat:
                    break
                epoch, shard = epoch + 1, 0
            out.append((epoch, shard))
        return out

    def next_doc(self) -> None:
        self.state.sample += 1
        self.state.offset = 0


class RowPacker:
    """Fills rows of ``context_length + 1`` tokens from a stream (see module docstring)."""

    def __init__(self, info: dict[str, Any], context_length: int):
        self.L = context_length
        self.T = info["image_tokens"]
        sp = info["special_ids"]
        self.pad, self.boi = sp["pad"], sp["boi"]
        self.non_target = np.array([sp[n] for n in NON_TARGET])
        if self.L < self.T + 3:
            raise ValueError(f"context_length={self.L} cannot hold an image of {self.T} tokens")

    def fill(self, stream: KindStream) -> tuple[np.ndarray, np.ndarray, list, np.ndarray] | None:
        """One row: (ids (L+1,), segment ids (L+1,), [(a document's images, index, first
        position)] (an image is decoded when collated), word tags (L+1,))."""
        L1 = self.L + 1
        ids = np.full(L1, self.pad, dtype=np.int64)
        seg = np.full(L1, -1, dtype=np.int64)
        tags = np.zeros(L1, dtype=np.int64)
        images: list[tuple[np.ndarray, int]] = []
        pos = n_seg = 0
        while pos < L1:
            doc = stream.current()
            if doc is None:
                break
            off = stream.state.offset
            cut = min(len(doc.ids), off + L1 - pos)  # doc tokens [off, cut) would fit
            boi = np.flatnonzero(doc.ids == self.boi)
            spans = [(m, b) for m, b in enumerate(boi) if off <= b < cut]
            if cut < len(doc.ids):
                for _, b in spans:  # an image whose <eoi> would not be an input position
                    if pos + (b + self.T + 1 - off) > self.L - 1:
                        cut = int(b)
                        break
            n = cut - off
            ids[pos : pos + n] = doc.ids[off:cut]
            if doc.tags is not None:
                tags[pos : pos + n] = doc.tags[off:cut]
            seg[pos : pos + n] = n_seg
            images += [(doc.images, m, pos + b + 1 - off) for m, b in spans if b < cut]
            if cut == len(doc.ids):
                stream.next_doc()
                pos += n
            elif pos + n == L1:  # the row is full: the next row starts with its last token
                stream.state.offset = cut - 1
                pos = L1
            else:  # an image did not fit: pad the rest, it starts the next row
                stream.state.offset = cut
                pos = L1
            n_seg += 1
        if n_seg == 0:
            return None
        return ids, seg, images, tags

    def target_mask(self, ids: np.ndarray, seg: np.ndarray) -> np.ndarray:
        """(..., L) True where the next token is a text target of the same document."""
        same_doc = (seg[..., :-1] == seg[..., 1:]) & (seg[..., :-1] >= 0)
        return same_doc & ~np.isin(ids[..., 1:], self.non_target)

    def collate(self, rows: list[tuple], kinds: list[int]) -> Batch:
        ids = np.stack([r[0] for r in rows])
        seg = np.stack([r[1] for r in rows])
        mask = self.target_mask(ids, seg)
        positions = np.zeros_like(seg[:, :-1])
        for b in range(len(rows)):  # position inside each segment
            s = seg[b, :-1]
            starts = np.r_[0, np.flatnonzero(s[1:] != s[:-1]) + 1]
            lengths = np.diff(np.r_[starts, len(s)])
            positions[b] = np.arange(len(s)) - np.repeat(starts, lengths)
        imgs = [(images[m], b, p) for b, r in enumerate(rows) for images, m, p in r[2]]
        if imgs:
            pixels = torch.from_numpy(np.stack([i for i, _, _ in imgs])).permute(0, 3, 1, 2)
            index = torch.tensor([[b, p] for _, b, p in imgs], dtype=torch.int64)
        else:
            pixels = torch.zeros((0, 3, 1, 1), dtype=torch.uint8)
            index = torch.zeros((0, 2), dtype=torch.int64)
        return Batch(
            tokens=torch.from_numpy(ids[:, :-1].copy()),
            targets=torch.from_numpy(ids[:, 1:].copy()),
            loss_mask=torch.from_numpy(mask.astype(np.float32)),
            doc_ids=torch.from_numpy(seg[:, :-1].copy()),
            positions=torch.from_numpy(positions),
            images=pixels.contiguous(),
            image_index=index,
            kinds=torch.tensor(kinds, dtype=torch.int64),
            target_tags=torch.from_numpy(np.stack([r[3][1:] for r in rows])),
        )


class PackedLoader:
    """Infinite training batches mixing the kinds; deterministic given the seed; resumable."""

    def __init__(
        self,
        shards_dir: str | Path,
        batch_size: int,
        context_length: int,
        mixture: dict[str, float],
        seed: int = 0,
        split: str = "train",
        start_step: int = 0,
        workers: int = 0,
        prefetch: int = 2,
        rows: tuple[int, int] | None = None,
    ):
        """``shards_dir``: a folder or URL; ``workers``: processes that read and decode shards
        ahead (0: here, when needed), ``prefetch`` of them per kind; ``rows``: the rows
        [start, stop) of each global batch of ``batch_size`` rows this loader returns (one
        rank's; None: all)."""
        self.batch_size, self.seed = batch_size, seed
        self.keep = rows or (0, batch_size)
        if not 0 <= self.keep[0] < self.keep[1] <= batch_size:
            raise ValueError(f"rows {rows} are not a part of a batch of {batch_size} rows")
        self.totals = Totals(0, 0, 0)  # of the last global batch
        info = load_info(shards_dir)
        self.packer = RowPacker(info, context_length)
        self.reader = ShardReader(info["image_size"], workers)
        self.probs = np.array([mixture.get(k, 0.0) for k in KINDS], dtype=np.float64)
        if not np.isclose(self.probs.sum(), 1.0) or (self.probs < 0).any():
            raise ValueError(f"mixture must be non-negative and sum to 1, got {mixture}")
        self.streams = []
        for i, kind in enumerate(KINDS):
            paths = shard_paths(shards_dir, split, kind)
            if self.probs[i] > 0 and not paths:
                raise ValueError(f"mixture gives {kind} p={self.probs[i]} but no {split} shards")
            stream = KindStream(paths, seed, i, True, True, self.reader, prefetch)
            self.streams.append(stream)
        self.step = 0
        for _ in range(start_step):  # replay: exactly the state an uninterrupted run had
            self.next_batch()

    @property
    def wait_s(self) -> float:
        """Seconds spent waiting for shards (reading and decoding them, without workers)."""
        return self.reader.wait_s

    def close(self) -> None:
        """Stop the reader processes (a loader without workers holds none)."""
        self.reader.close()

    def kinds_at(self, step: int) -> list[int]:
        rng = np.random.default_rng([self.seed, step])
        return rng.choice(len(KINDS), size=self.batch_size, p=self.probs).tolist()

    def next_batch(self) -> Batch:
        """The next global batch's rows this loader keeps (:attr:`totals`: the whole batch's)."""
        kinds = self.kinds_at(self.step)
        rows = [self.packer.fill(self.streams[k]) for k in kinds]
        self.step += 1
        targets = sum(int(self.packer.target_mask(r[0], r[1]).sum()) for r in rows)
        self.totals = Totals(len(rows), targets, sum(len(r[2]) for r in rows))
        a, b = self.keep
        return self.packer.collate(rows[a:b], kinds[a:b])

    def __iter__(self) -> Iterator[Batch]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "streams": [asdict(s.state) for s in self.streams]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = state["step"]
        for s, st in zip(self.streams, state["streams"], strict=True):
            s.state = StreamState(**st)


def val_batches(
    shards_dir: str | Path, kind: str, batch_size: int, context_length: int
) -> Iterator[Batch]:
    """Every validation document of one kind once, in stored order, packed like training."""
    info = load_info(shards_dir)
    packer = RowPacker(info, context_length)
    reader = ShardReader(info["image_size"])
    stream = KindStream(shard_paths(shards_dir, "val", kind), 0, KINDS.index(kind), False, False,
                        reader)  # fmt: skip
    k = KINDS.index(kind)
    while True:
        rows = []
        while len(rows) < batch_size and (row := packer.fill(stream)) is not None:
            rows.append(row)
        if not rows:
            return
        yield packer.collate(rows, [k] * len(rows))
