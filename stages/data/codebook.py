"""The visual codebook (stage ``codebook``, entry point stages/codebook.py): the discrete
visual tokenizer, k-means codes over training image patches.

Streams the TRAIN shards of the image kinds (caption, interleaved; all of them, or a seeded sample
of ``codebook.max_shards`` when there are more) one shard at a time, keeps a uniform reservoir
sample of ``codebook.samples`` patches (memory bounded by the sample, not the
corpus), normalises them as every architecture does (model/patches.py: global scaling to
[-1, 1], channel-last) and runs k-means: greedy k-means++ seeding, then at most
``codebook.iters`` Lloyd iterations, stopping early when no assignment changes. A cluster left
empty is re-seeded at the sample's farthest patches from their codes. Image and patch sizes
come from ``data/shards/info.json``: the shards are the source of truth.

Writes ``data/codebook/codebook.pt`` (:meth:`model.discrete.VisualCodebook.save`) and
``data/codebook/report.json``. Every random choice comes from ``codebook.seed`` and k-means runs
on one thread, so the same params and shards give a byte-identical ``codebook.pt`` on a given
machine (float32 matmul kernels may differ across CPU types).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from model.discrete import VisualCodebook, nearest_code
from model.patches import normalise, patchify
from stages.common.inputs import bounded
from stages.data.shard_format import load_info, read_shard, shard_paths
from stages.params import CodebookParams, SyntheticCorpus

log = logging.getLogger(__name__)

IMAGE_KINDS = ("caption", "interleaved")  # the kinds whose documents hold images
ROWS = 4096  # rows per chunk of the elementwise passes over the sample (small temporaries)


class CodebookError(ValueError):
    """The data cannot give the codebook params asked for (the message names the key)."""


# --- sampling -------------------------------------------------------------------------------


def train_patches(
    shards: Path, image_size: int, patch_size: int, max_shards: int | None = None, seed: int = 0
) -> Iterator[np.ndarray]:
    """Per train shard of the image kinds (all, or a seeded sample of ``max_shards``): its
    patches ``(m, 3 p²)`` uint8, in stored order."""
    paths = [p for kind in IMAGE_KINDS for p in shard_paths(shards, "train", kind)]
    paths = bounded(paths, max_shards, seed)
    for path in tqdm(paths, desc="codebook: sample patches", unit="shard"):
        images = [s.images for s in read_shard(path) if len(s.images)]
        if not images:
            continue
        x = np.concatenate(images)  # (n, S, S, 3)
        if x.shape[1:] != (image_size, image_size, 3):
            raise CodebookError(f"{path}: images {x.shape[1:]} but info.json says {image_size}")
        x = torch.from_numpy(x).permute(0, 3, 1, 2)  # (n, 3, S, S), as Batch.images
        yield patchify(x, patch_size).flatten(0, 1).to(torch.uint8).numpy()


def reservoir_sample(
    chunks: Iterable[np.ndarray], n: int, rng: np.random.Generator
) -> tuple[np.ndarray, int]:
    """A uniform sample without replacement of ``n`` rows from a stream of row arrays.

    Algorithm R, vectorised per chunk: row ``i >= n`` draws ``j ~ U{0..i}`` and replaces slot
    ``j`` if ``j < n``; within a chunk the later row wins a slot, as in the sequential form.
    Returns (the sample, in slot order; rows seen). With ``n >= rows seen`` it is every row,
    in stream order.
    """
    buf: np.ndarray | None = None
    seen = 0
    for rows in chunks:
        m = len(rows)
        if buf is None:
            buf = np.empty((0, *rows.shape[1:]), dtype=rows.dtype)
        if len(buf) < min(n, seen + m):  # grow by doubling up to n: a large n costs no memory
            grown = np.empty((min(n, max(seen + m, 2 * len(buf))), *buf.shape[1:]), buf.dtype)
            grown[:seen] = buf[:seen]
            buf = grown
        fill = max(0, min(n - seen, m))
        buf[seen : seen + fill] = rows[:fill]
        if fill < m:
            j = rng.integers(0, np.arange(seen + fill, seen + m) + 1)  # slot drawn per row
            hit = np.flatnonzero(j < n)[::-1]  # latest first, so np.unique keeps the last
            slots, first = np.unique(j[hit], return_index=True)
            buf[slots] = rows[fill + hit[first]]
        seen += m
    if buf is None:
        return np.empty((0, 0), dtype=np.uint8), 0
    return buf[: min(n, seen)], seen


# --- k-means --------------------------------------------------------------------------------


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run with ``n`` intra-op threads (one thread makes the float sums reproducible)."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def quantisation_mse(
    x: torch.Tensor, codes: torch.Tensor, ids: torch.Tensor | None = None
) -> float:
    """Mean over patches and their ``3 p²`` values of ``(x - code)²``, nearest codes by default.

    Exact (from the difference, summed in float64), unlike the distances of ``nearest_code``.
    """
    if ids is None:
        ids, _ = nearest_code(x, codes)
    total = 0.0
    for s in range(0, len(x), ROWS):
        diff = x[s : s + ROWS] - codes[ids[s : s + ROWS]]
        total += float(diff.pow(2).sum(dtype=torch.float64))
    return total / x.numel()


def kmeans_pp(x: torch.Tensor, k: int, rng: np.random.Generator) -> torch.Tensor:
    """Greedy k-means++ seeding (Arthur & Vassilvitskii 2007; ``2 + ln k`` trials per code, as
    scikit-learn): each next code is, of a few candidates drawn with probability proportional
    to the squared distance to the nearest chosen code, the one that lowers the total most."""
    N = x.shape[0]
    trials = 2 + int(math.log(k))
    x2 = (x * x).sum(1)  # (N,)
    chosen = [int(rng.integers(N))]
    d2 = (x - x[chosen[0]]).pow(2).sum(1)  # (N,) squared distance to the nearest chosen code
    for _ in range(1, k):
        cum = torch.cumsum(d2, 0, dtype=torch.float64)
        if cum[-1] == 0:
            raise ValueError(f"fewer than k={k} distinct rows to seed k-means from")
        u = torch.from_numpy(rng.random(trials)) * cum[-1]
        cand = torch.searchsorted(cum, u, right=True).clamp_max(N - 1)  # (L,) never a 0-mass row
        dc = torch.addmm(x2[:, None], x, x[cand].T, alpha=-2.0) + x2[cand]  # (N, L)
        total = torch.minimum(d2[:, None], dc.clamp_min(0)).sum(0, dtype=torch.float64)
        b = int(total.argmin())
        best, db = int(cand[b]), dc[:, b].clamp_min(0)
        near = torch.nonzero(db < 1e-3).flatten()  # recompute exactly: duplicates get 0 mass
        db[near] = (x[near] - x[best]).pow(2).sum(1)
        d2 = torch.minimum(d2, db)
        chosen.append(best)
    return x[chosen].clone()


def update_codes(
    x: torch.Tensor, ids: torch.Tensor, d2: torch.Tensor, k: int
) -> tuple[torch.Tensor, int]:
    """Lloyd's update: each code becomes the mean of its patches (summed in float64).

    A code with no patches is re-seeded at the patches farthest from their current code
    (``d2``: their squared distances), the largest first. Returns (codes, number re-seeded).
    """
    sums = torch.zeros(k, x.shape[1], dtype=torch.float64)
    for s in range(0, len(x), ROWS):
        sums.index_add_(0, ids[s : s + ROWS], x[s : s + ROWS].double())
    counts = torch.bincount(ids, minlength=k)
    codes = (sums / counts.clamp_min(1)[:, None]).to(x.dtype)
    empty = torch.nonzero(counts == 0).flatten()
    if len(empty):
        far = torch.argsort(d2, descending=True, stable=True)[: len(empty)]
        codes[empty] = x[far]
    return codes, len(empty)


@dataclass
class KMeansResult:
    codes: torch.Tensor  # (K, D)
    ids: torch.Tensor  # (N,) nearest code of each sample row under ``codes``
    iterations: int  # Lloyd updates done
    converged: bool  # stopped because no assignment changed
    reseeded: int  # empty clusters re-seeded, summed over iterations
    mse_history: list[float]  # MSE after seeding and each update (matmul distances, ~1e-5 rel.)


def kmeans(x: torch.Tensor, k: int, iters: int, seed: int) -> KMeansResult:
    """k-means++ seeding, then up to ``iters`` Lloyd iterations on rows ``x (N, D)``."""
    rng = np.random.default_rng([seed, 1])
    codes = kmeans_pp(x, k, rng)
    ids, d2 = nearest_code(x, codes)
    history = [float(d2.sum(dtype=torch.float64)) / x.numel()]
    converged, reseeded = False, 0
    bar = tqdm(range(iters), desc=f"codebook: k-means K={k}", unit="iter")
    for _ in bar:
        codes, n_empty = update_codes(x, ids, d2, k)
        reseeded += n_empty
        new_ids, d2 = nearest_code(x, codes)
        moved = int((new_ids != ids).sum())
        ids = new_ids
        history.append(float(d2.sum(dtype=torch.float64)) / x.numel())
        bar.set_postfix(mse=f"{history[-1]:.5f}", moved=moved)
        if moved == 0:
            converged = True
            break
    bar.close()
    return KMeansResult(codes, ids, len(history) - 1, converged, reseeded, history)


def perplexity(ids: torch.Tensor, k: int) -> float:
    """exp(entropy) of the code usage: K when every code is used equally, 1 when one is."""
    p = torch.bincount(ids, minlength=k).double() / len(ids)
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


# --- the stage ------------------------------------------------------------------------------


def build_codebook(shards: Path, params: CodebookParams) -> tuple[VisualCodebook, dict[str, Any]]:
    """Sample patches from the train shards, fit the codes; returns (codebook, report). The
    report holds no wall time: the same shards and params give the same bytes, so a rerun of the
    stage leaves its outputs (and the stages downstream of them) unchanged."""
    info = load_info(shards)
    S, p, K = info["image_size"], info["patch_size"], params.n_codes
    rng = np.random.default_rng([params.seed, 0])
    source = train_patches(shards, S, p, params.max_shards, params.seed)
    patches, seen = reservoir_sample(source, params.samples, rng)
    if seen == 0:
        raise CodebookError(
            f"no images in the train shards of {', '.join(IMAGE_KINDS)} under {shards}"
        )
    distinct = len(np.unique(np.ascontiguousarray(patches).view(f"V{patches.shape[1]}")))
    if distinct < K:
        raise CodebookError(
            f"codebook.n_codes={K} is more than the {distinct} distinct patches sampled "
            f"({len(patches)} of {seen} train patches, codebook.samples={params.samples}): "
            f"lower codebook.n_codes or add image data"
        )
    x = normalise(torch.from_numpy(patches))  # (N, 3 p²) in [-1, 1]
    with torch_threads(1):
        res = kmeans(x, K, params.iters, params.seed)
        baseline = np.random.default_rng([params.seed, 2]).choice(len(x), K, replace=False)
        report = {
            "n_codes": K,
            "samples": len(x),
            "samples_requested": params.samples,
            "patches_seen": seen,
            "image_size": S,
            "patch_size": p,
            "patch_dim": x.shape[1],
            "kinds": list(IMAGE_KINDS),
            "seed": params.seed,
            # mean over the sampled patches and their 3p² values of (x - code)², x in [-1, 1]
            "mse": quantisation_mse(x, res.codes, res.ids),
            "baseline_mse": quantisation_mse(x, x[torch.from_numpy(baseline)]),
            "perplexity": perplexity(res.ids, K),
            "codes_used": int((torch.bincount(res.ids, minlength=K) > 0).sum()),
            "iterations": res.iterations,
            "iters_max": params.iters,
            "converged": res.converged,
            "reseeded": res.reseeded,
            "mse_history": res.mse_history,
        }
    return VisualCodebook(res.codes, p), report


# --- what the codes keep of the world's images ------------------------------------------------


def look_information(
    codebook: VisualCodebook, w: SyntheticCorpus, seed: int, batch: int = 1024
) -> dict[str, Any]:
    """How much of what the synthetic world's images show survives the codebook.

    An image cell shows one entity's *look* (its class and visible code bits, stages/data/world.py);
    a model reading codes can only tell looks apart whose cells quantise to different codes. Every
    distinct look is drawn noise-free in a cell (:func:`stages.data.synthetic.render`) and its
    patches quantised; with each look's Zipf mass m (normalised), in bits: ``bits_per_look``
    H(look), ``bits_lost`` H(look | codes) = H(look) - H(codes) (the codes are a function of the
    look), ``share_lost`` their ratio, and ``mass_shared`` the mass of looks whose codes another
    look shares. Information, not pixel error: pixel noise and exact shades cost nothing here
    unless they merge looks. With the world's pixel noise, ``noise`` gives the same for one noisy
    drawing per look (a plug-in estimate: a look's codes taken as that drawing's) and the mass of
    looks whose codes the noise changes. ``{"skipped": reason}`` when a cell is not a whole number
    of patches.
    """
    from stages.data.synthetic import render_many
    from stages.data.world import world

    S, p = w.image_size, codebook.patch_size
    cell = S // 2
    if S % 2 or cell % p:
        return {"skipped": f"a {cell}-pixel image cell is not a whole number of {p}-pixel patches"}
    W = world(w, seed)
    looks, first = np.unique(W.looks, return_index=True)
    mass = np.exp(W.look_logmass(looks))
    mass /= mass.sum()
    k, side = cell // p, S // p
    cells = [(c // 2, c % 2) for c in range(4)]

    def codes_of(rng: np.random.Generator | None) -> np.ndarray:
        keys = np.empty((len(looks), k * k), dtype=np.int64)
        for s in range(0, len(looks), 4 * batch):
            ranks = first[s : s + 4 * batch] + 1
            scenes = [tuple((c, int(r)) for c, r in enumerate(ranks[i : i + 4]))
                      for i in range(0, len(ranks), 4)]  # fmt: skip
            imgs = render_many(scenes, W, rng)  # (B, S, S, 3)
            ids = codebook.encode(torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous())
            ids = ids.reshape(len(scenes), side, side).numpy()
            for i, sc in enumerate(scenes):
                for c, _ in sc:
                    cy, cx = cells[c]
                    keys[s + 4 * i + c] = ids[
                        i, cy * k : (cy + 1) * k, cx * k : (cx + 1) * k
                    ].ravel()
        return keys

    def lost_bits(keys: np.ndarray) -> tuple[float, np.ndarray]:
        _, group = np.unique(keys, axis=0, return_inverse=True)
        group = group.ravel()
        gmass = np.bincount(group, weights=mass)
        h_codes = float(-(gmass[gmass > 0] * np.log2(gmass[gmass > 0])).sum())
        return max(0.0, h_look - h_codes), np.bincount(group)[group]

    h_look = float(-(mass * np.log2(mass)).sum())
    clean = codes_of(None)
    lost, shared = lost_bits(clean)
    out = {
        "looks": int(len(looks)),
        "code_tuples": int(len(np.unique(clean, axis=0))),
        "bits_per_look": h_look,
        "bits_lost": lost,
        "share_lost": lost / h_look if h_look > 0 else 0.0,
        "mass_shared": float(mass[shared > 1].sum()),
    }
    if w.noise > 0:  # one noisy drawing per look, as the shards hold them: codes that flip
        noisy = codes_of(np.random.default_rng([seed, 7]))
        lost_n, _ = lost_bits(noisy)
        out["noise"] = {"mass_changed": float(mass[(noisy != clean).any(1)].sum()),
                        "bits_lost": lost_n, "share_lost": lost_n / h_look if h_look > 0 else 0.0}  # fmt: skip
    return out
