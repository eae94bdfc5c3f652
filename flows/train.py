"""Train one grid point: the paper's recipe, evaluation per data kind, checkpoints, resume.

Recipe (paper §2.1 and App. B): decoupled AdamW (β 0.9, 0.95), weight decay, gradient clipping
1.0, linear warmup, constant learning rate, then a cooldown over the last 20% of the steps to 0
with the 1-sqrt shape (Hägele et al. 2024). Learning rate, batch size and warmup are functions of
N (params ``train``, OLMo-ladder style), never per-point constants. fp32 with pinned threads on
CPU; bf16 autocast (and optionally ``torch.compile``) on GPU.

**Cooldown branching** (beyond the paper, Hägele et al. 2024): the points of one *group* (same
architecture, size, mixture and seed; different token budgets) share their warmup and
constant-lr phase. The group's *trunk* is trained once, with a checkpoint at each budget's
cooldown start; each budget then branches from its checkpoint and gets its own cooldown. A
branched point is the same computation as a separately trained one (tests check it), at a
fraction of the cost of the D-sweep.

**Resume**: trunk and branch save checkpoints (model, optimizer, loader state, counters) every
``checkpoint_every_steps``; a point killed and restarted continues from its last checkpoint
and ends with the same metrics as an uninterrupted run.

``python -m flows.train --point '{"arch": "early", "size": "xxs", "tokens": 100000,
"mixture": "45-45-10", "seed": 0}'`` trains one point in this process and prints its record.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from itertools import islice, product
from pathlib import Path
from typing import Any

import torch

from model.config import ModelConfig, MoEConfig, size_config
from model.counting import count_params, step_flops, training_compute
from model.model import MultimodalLM
from stages.loader import PackedLoader, val_batches
from stages.params import KINDS, Params, TrainParams, load_params
from stages.shard_format import load_info

log = logging.getLogger(__name__)

ARCH_SPECS: dict[str, dict[str, Any]] = {
    "early": {"arch": "early", "moe": False, "modality_aware": False},
    "late": {"arch": "late", "moe": False, "modality_aware": False},
    "discrete": {"arch": "discrete", "moe": False, "modality_aware": False},
    "early-moe": {"arch": "early", "moe": True, "modality_aware": False},
    "early-moe-aware": {"arch": "early", "moe": True, "modality_aware": True},
    "late-moe": {"arch": "late", "moe": True, "modality_aware": False},
    "discrete-moe": {"arch": "discrete", "moe": True, "modality_aware": False},
}
# Peak dense FLOP/s per device for MFU (explicit, STYLE.md). CPU: this machine's measured fp32
# single-thread 256x256 matmul ceiling (STACK-NOTES), times the threads used.
PEAK_FLOPS = {
    "cpu-thread": 38e9,
    "NVIDIA H100 80GB HBM3": 989e12,  # bf16 dense, SXM
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
}
EVAL_ROWS = 8  # rows per validation batch: the same held-out rows for every point
# train params that do not change a point's result (kept out of its id)
NOT_IN_ID = {"threads", "eval_every_tokens", "checkpoint_every_steps", "branch_cooldowns"}


@dataclass(frozen=True)
class Point:
    arch: str  # a key of ARCH_SPECS
    size: str  # a ladder size name (model/config.py SIZES)
    tokens: int  # D: decoder tokens to train on
    mixture: str  # a key of params.grid.mixtures
    seed: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Point:
        return cls(**{k: d[k] for k in ("arch", "size", "tokens", "mixture", "seed")})


def expand_grid(params: Params) -> list[Point]:
    g = params.grid
    return [
        Point(a, s, t, m, seed)
        for a, s, m, seed, t in product(g.archs, g.sizes, g.mixtures, g.seeds, sorted(g.tokens))
    ]


def data_fingerprint(shards: Path, codebook: Path | None) -> str:
    h = hashlib.sha256((Path(shards) / "manifest.parquet").read_bytes())
    if codebook is not None and Path(codebook).exists():
        h.update(Path(codebook).read_bytes())
    return h.hexdigest()[:16]


def _id(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _identity(point: Point, params: Params, fingerprint: str) -> dict[str, Any]:
    train = {k: v for k, v in params.train.model_dump().items() if k not in NOT_IN_ID}
    return {
        "point": point.to_dict(),
        "mixture": params.grid.mixtures[point.mixture].as_dict(),
        "model": params.model.model_dump(),
        "train": train,
        "context_length": params.data.context_length,
        "data": fingerprint,
    }


def point_id(point: Point, params: Params, fingerprint: str) -> str:
    """Hash of everything that changes the point's result."""
    return _id(_identity(point, params, fingerprint))


def group_id(point: Point, params: Params, fingerprint: str) -> str:
    """The same without the token budget: points of a group share one trunk."""
    ident = _identity(point, params, fingerprint)
    del ident["point"]["tokens"]
    return _id(ident)


# --------------------------------------------------------------------------- recipe


@dataclass(frozen=True)
class Schedule:
    """Batch, lr and step counts of one point, all derived from N (params ``train``)."""

    batch_rows: int
    lr: float  # peak
    warmup_steps: int
    steps: int
    cooldown_start: int

    def trunk_lr(self, step: int) -> float:
        """Warmup then constant: the lr of the shared trunk."""
        return self.lr * min(1.0, (step + 1) / max(1, self.warmup_steps))

    def lr_at(self, step: int) -> float:
        """Trunk lr, then 1-sqrt cooldown from its value at ``cooldown_start`` towards 0."""
        if step < self.cooldown_start:
            return self.trunk_lr(step)
        frac = (step - self.cooldown_start) / max(1, self.steps - self.cooldown_start)
        return self.trunk_lr(self.cooldown_start) * (1.0 - math.sqrt(frac))


def schedule(tokens: int, n: int, tp: TrainParams, context: int) -> Schedule:
    scale = n / tp.n_ref
    rows = 2 ** max(0, round(math.log2(max(1.0, tp.batch_rows_ref * scale**tp.batch_exponent))))
    batch_tokens = rows * context
    steps = max(2, round(tokens / batch_tokens))
    warmup = max(1, math.ceil(tp.warmup_tokens_ref * scale**tp.warmup_exponent / batch_tokens))
    cooldown = max(1, round(tp.cooldown_fraction * steps))
    return Schedule(rows, tp.lr_ref * scale**tp.lr_exponent, warmup, steps, steps - cooldown)


def model_config(point: Point, params: Params, info: dict, codebook_size: int) -> ModelConfig:
    spec = ARCH_SPECS[point.arch]
    mp = params.model
    moe = None
    if spec["moe"]:
        moe = MoEConfig(
            n_experts=mp.n_experts,
            top_k=mp.top_k,
            aux_loss_weight=mp.aux_loss_weight,
            z_loss_weight=mp.z_loss_weight,
            modality_aware=spec["modality_aware"],
        )
    base = ModelConfig(
        arch=spec["arch"],
        vocab_size=info["vocab_size"],
        context_length=params.data.context_length,
        image_size=info["image_size"],
        patch_size=info["patch_size"],
        codebook_size=codebook_size,
        special_ids=info["special_ids"],
        moe=moe,
        enc_lr_mult=mp.enc_lr_mult,
    )
    return size_config(point.size, base)


def build_optimizer(model: MultimodalLM, sched: Schedule, tp: TrainParams) -> torch.optim.AdamW:
    """Decoupled AdamW: the decay per step is weight_decay·lr_t/lr_peak (not lr_t·wd), applied to
    matrices only; late fusion's encoder runs at ``enc_lr_mult`` times the decoder's lr."""
    decoder, vision = model.parameter_groups()
    groups = []
    for params, mult in ((decoder, 1.0), (vision, model.cfg.enc_lr_mult)):
        peak = sched.lr * mult
        decay = [p for p in params if p.ndim >= 2]
        rest = [p for p in params if p.ndim < 2]
        groups += [
            {"params": decay, "weight_decay": tp.weight_decay / peak, "lr_mult": mult},
            {"params": rest, "weight_decay": 0.0, "lr_mult": mult},
        ]
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=sched.lr, betas=(0.9, 0.95), eps=1e-8)


def peak_flops(device: torch.device, threads: int) -> float:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((v for k, v in PEAK_FLOPS.items() if name.startswith(k)), float("nan"))
    return PEAK_FLOPS["cpu-thread"] * threads


# --------------------------------------------------------------------------- training


@dataclass
class Counters:
    step: int = 0
    tokens: int = 0  # decoder tokens
    image_tokens: int = 0
    text_targets: int = 0
    flops: float = 0.0  # model FLOPs done (model/counting.py step_flops)
    train_seconds: float = 0.0


class Run:
    """Model, optimizer, loader and counters of one training segment, checkpointable."""

    def __init__(self, point: Point, params: Params, shards: Path, codebook: Path | None):
        self.point, self.params, self.shards = point, params, Path(shards)
        info = load_info(shards)
        cb = None
        if ARCH_SPECS[point.arch]["arch"] == "discrete":
            from model.discrete import VisualCodebook

            if codebook is None or not Path(codebook).exists():
                raise FileNotFoundError("arch 'discrete' needs data/codebook/codebook.pt")
            cb = VisualCodebook.from_file(codebook)
        self.cfg = model_config(point, params, info, cb.size if cb is not None else 256)
        self.counts = count_params(self.cfg)
        self.sched = schedule(point.tokens, self.counts.N, params.train, params.data.context_length)
        want = params.train.device
        cuda = want == "cuda" or (want == "auto" and torch.cuda.is_available())
        self.device = torch.device("cuda" if cuda else "cpu")
        torch.manual_seed(point.seed)
        self.model = MultimodalLM(self.cfg, cb).to(self.device)
        self.opt = build_optimizer(self.model, self.sched, params.train)
        mixture = params.grid.mixtures[point.mixture].as_dict()
        self.loader = PackedLoader(
            shards, self.sched.batch_rows, params.data.context_length, mixture, seed=point.seed
        )
        self.c = Counters()
        self.forward = self.model
        if self.device.type == "cuda" and params.train.compile:
            self.forward = torch.compile(self.model)

    # --- checkpoints
    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        state = {
            "model": self.model.state_dict(),
            "opt": self.opt.state_dict(),
            "loader": self.loader.state_dict(),
            "counters": asdict(self.c),
        }
        torch.save(state, tmp)
        os.replace(tmp, path)  # atomic: a kill never leaves half a checkpoint

    def load(self, path: Path) -> None:
        state = torch.load(path, map_location=self.device, weights_only=True)
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])
        self.loader.load_state_dict(state["loader"])
        self.c = Counters(**state["counters"])

    # --- one optimizer step
    def step(self, lr: float, fail: bool = False) -> float:
        batch = self.loader.next_batch().to(self.device)
        for g in self.opt.param_groups:
            g["lr"] = lr * g["lr_mult"]
        t0 = time.perf_counter()
        with torch.autocast("cuda", torch.bfloat16, enabled=self.device.type == "cuda"):
            out = self.forward(batch)
        loss = out.total
        if fail:
            loss = loss * float("nan")
        value = loss.item()
        if math.isfinite(value):
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.params.train.grad_clip)
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.c.train_seconds += time.perf_counter() - t0
        self.c.step += 1
        self.c.tokens += batch.tokens.numel()
        self.c.image_tokens += len(batch.images) * self.cfg.image_tokens
        self.c.text_targets += int(out.n_targets)
        self._last_flops = step_flops(
            self.cfg, *batch.tokens.shape, int(out.n_targets), len(batch.images)
        )
        self.c.flops += self._last_flops
        self._last_loss = out.loss.item()
        self._last_aux = float(out.aux_loss.detach()) if out.moe else None
        return value

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation loss per kind on fixed held-out rows, and their average (paper §2.1)."""
        self.model.eval()
        out = {}
        ctx, n = self.params.data.context_length, self.params.train.eval_batches
        # MoE: image and text tokens per expert and layer (routing_table); none for dense models
        self.routing = [{"image": 0.0, "text": 0.0} for _ in range(self.cfg.n_layers)]
        moe = self.cfg.moe is not None
        for kind in KINDS:
            total = count = 0.0
            for b in islice(val_batches(self.shards, kind, EVAL_ROWS, ctx), n):
                with torch.autocast("cuda", torch.bfloat16, enabled=self.device.type == "cuda"):
                    o = self.model(b.to(self.device))
                total += o.loss.item() * int(o.n_targets)
                count += int(o.n_targets)
                if moe:
                    n_img = len(b.images) * self.cfg.image_tokens
                    n_txt = b.tokens.numel() - n_img
                    for acc, layer in zip(self.routing, o.moe, strict=True):
                        acc["image"] = acc["image"] + layer["image_frac"].float().cpu() * n_img
                        acc["text"] = acc["text"] + layer["text_frac"].float().cpu() * n_txt
            if count:
                out[f"val_{kind}"] = total / count
        if out:
            out["val_avg"] = sum(out.values()) / len(out)
        self.model.train()
        return out

    def routing_table(self) -> dict[str, Any]:
        """After :meth:`evaluate` of a MoE model: per layer, the share of the validation image
        tokens and of the text tokens that each expert received (paper Figs. 12-13)."""
        layers = []
        for acc in self.routing:
            img, txt = (torch.as_tensor(acc[k], dtype=torch.float64) for k in ("image", "text"))
            layers.append(
                {
                    "image": (img / img.sum().clamp(min=1e-12)).tolist(),
                    "text": (txt / txt.sum().clamp(min=1e-12)).tolist(),
                    "image_tokens": float(img.sum()),
                    "text_tokens": float(txt.sum()),
                }
            )
        return {"arch": self.point.arch, "size": self.point.size, "layers": layers}


def _jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class _Metrics:
    """A metrics.jsonl that survives resume: entries past the restored step are dropped."""

    def __init__(self, path: Path, upto_step: int, on_metrics: Callable | None):
        self.path, self.on_metrics = path, on_metrics
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = [r for r in _jsonl(path) if r["step"] <= upto_step]
        path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def log(self, step: int, tokens: int, metrics: dict[str, float]) -> None:
        rec = {"step": step, "tokens": tokens, **metrics}
        with self.path.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.on_metrics is not None:
            self.on_metrics(step, metrics)


class Diverged(RuntimeError):
    pass


def _advance(
    run: Run,
    until: int,
    lr_at: Callable[[int], float],
    ckpt: Path,
    metrics: _Metrics,
    save_at: dict[int, Path],
    fail_at_step: int | None,
) -> None:
    """Train ``run`` up to step ``until`` (exclusive), checkpointing and logging on the way."""
    tp = run.params.train
    eval_every = max(
        1, round(tp.eval_every_tokens / (run.sched.batch_rows * run.params.data.context_length))
    )
    while run.c.step < until:
        if run.c.step in save_at and not save_at[run.c.step].exists():
            run.save(save_at[run.c.step])
        s = run.c.step
        lr = lr_at(s)
        t0 = time.perf_counter()
        loss = run.step(lr, fail=fail_at_step == s)
        dt = time.perf_counter() - t0
        if not math.isfinite(loss):
            raise Diverged(f"non-finite training loss ({loss}) at step {s}")
        if loss > tp.divergence_loss:
            raise Diverged(f"training loss {loss:.3g} > train.divergence_loss at step {s}")
        tokens = run.sched.batch_rows * run.params.data.context_length
        m = {
            "train_loss": loss,
            "lr": lr,
            "tokens_per_s": tokens / dt,
            "mfu": run._last_flops / dt / peak_flops(run.device, tp.threads),
        }
        if run._last_aux is not None:
            m["moe_aux_loss"] = run._last_aux
        if run.c.step % eval_every == 0 and run.c.step < until:
            m |= run.evaluate()
        metrics.log(run.c.step, run.c.tokens, m)
        if run.c.step % tp.checkpoint_every_steps == 0:
            run.save(ckpt)
    if until in save_at and not save_at[until].exists():
        run.save(save_at[until])


def _trunk(
    point: Point, params: Params, run: Run, gdir: Path, fail_at_step: int | None, on_metrics
) -> Path:
    """Make sure the group's trunk checkpoint at this point's cooldown start exists."""
    cs = run.sched.cooldown_start
    branch = gdir / f"branch-{cs:08d}.pt"
    if branch.exists():
        return branch
    latest = gdir / "trunk-latest.pt"
    if latest.exists():
        past = torch.load(latest, weights_only=True)["counters"]["step"] > cs
        if past:  # a budget added after the trunk went by: replay the trunk to it, aside
            latest = gdir / f"trunk-replay-{cs:08d}.pt"
        if latest.exists():
            run.load(latest)
    budgets = {  # every budget of the group gets its checkpoint as the trunk passes it
        schedule(t, run.counts.N, params.train, params.data.context_length).cooldown_start
        for t in params.grid.tokens
    } | {cs}
    save_at = {s: gdir / f"branch-{s:08d}.pt" for s in budgets if s >= run.c.step}
    metrics = _Metrics(gdir / "metrics.jsonl", run.c.step, on_metrics)
    _advance(run, cs, run.sched.trunk_lr, latest, metrics, save_at, fail_at_step)
    run.save(latest)
    return branch


def train_point(
    point: Point,
    params: Params,
    *,
    shards: Path,
    codebook: Path | None,
    workdir: Path,
    on_metrics: Callable[[int, dict[str, float]], None] | None = None,
    fail_at_step: int | None = None,
) -> dict[str, Any]:
    """Train (or resume) one point; return its record (see module docstring)."""
    workdir = Path(workdir)
    fp = data_fingerprint(shards, codebook)
    pid, gid = point_id(point, params, fp), group_id(point, params, fp)
    pdir = workdir / "points" / pid
    record_path = pdir / "record.json"
    if record_path.exists():
        rec = json.loads(record_path.read_text())
        if rec.get("status") == "ok":
            return rec
    pdir.mkdir(parents=True, exist_ok=True)
    wall0 = time.perf_counter()
    if params.train.device != "cuda" and not torch.cuda.is_available():
        torch.set_num_threads(params.train.threads)
    run = Run(point, params, shards, codebook)
    rec: dict[str, Any] = _describe(point, run, pid, gid)
    latest = pdir / "latest.pt"
    try:
        trunk_rows: list[dict] = []
        if latest.exists():  # resume this point's own segment
            run.load(latest)
        elif params.train.branch_cooldowns:
            gdir = workdir / "groups" / gid
            branch = _trunk(point, params, run, gdir, fail_at_step, None)
            run.load(branch)
            trunk_rows = [r for r in _jsonl(gdir / "metrics.jsonl") if r["step"] <= run.c.step]
        if not latest.exists():
            metrics_path = pdir / "metrics.jsonl"
            metrics_path.write_text("".join(json.dumps(r) + "\n" for r in trunk_rows))
        metrics = _Metrics(pdir / "metrics.jsonl", run.c.step, on_metrics)
        _advance(run, run.sched.steps, run.sched.lr_at, latest, metrics, {}, fail_at_step)
        final = run.evaluate()
        metrics.log(run.c.step, run.c.tokens, final)
        if run.cfg.moe is not None:
            (pdir / "routing.json").write_text(json.dumps(run.routing_table()))
        rec |= {f"loss_{k.removeprefix('val_')}": v for k, v in final.items()}
        rec["train_loss"] = getattr(run, "_last_loss", None)
        rec["status"], rec["error"] = "ok", None
    except Diverged as e:
        rec["status"], rec["error"] = "failed", str(e)
        log.warning("point %s failed: %s", pid, e)
    rec |= _totals(run, time.perf_counter() - wall0)
    tmp = record_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(rec, indent=1, sort_keys=True))
    os.replace(tmp, record_path)
    if rec["status"] == "ok":
        latest.unlink(missing_ok=True)
    return rec


def _describe(point: Point, run: Run, pid: str, gid: str) -> dict[str, Any]:
    spec, cfg, s = ARCH_SPECS[point.arch], run.cfg, run.sched
    return {
        "point_id": pid,
        "group_id": gid,
        "arch": point.arch,
        "arch_base": spec["arch"],
        "moe": spec["moe"],
        "modality_aware": spec["modality_aware"],
        "size": point.size,
        "tokens_budget": point.tokens,
        "mixture": point.mixture,
        "seed": point.seed,
        "width": cfg.d_model,
        "depth": cfg.n_layers,
        "N": run.counts.N,
        "N_v": run.counts.N_v,
        "N_total": run.counts.N_total,
        "batch_rows": s.batch_rows,
        "lr": s.lr,
        "steps": s.steps,
        "branch_step": s.cooldown_start,
        "device": str(run.device),
        **{f"loss_{k}": None for k in (*KINDS, "avg")},
    }


def _totals(run: Run, wall: float) -> dict[str, Any]:
    c, cfg = run.c, run.cfg
    train_s = max(c.train_seconds, 1e-9)
    return {
        "D": c.tokens,
        "D_image": c.image_tokens,
        "D_text": c.text_targets,
        "C": training_compute(cfg, c.tokens, c.image_tokens),
        "flops": c.flops,
        "wall_s": wall,
        "train_s": c.train_seconds,
        "tokens_per_s": c.tokens / train_s,
        "mfu": c.flops / train_s / peak_flops(run.device, run.params.train.threads),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="Train one grid point (the grid flow runs this for every point).",
        epilog=__doc__.split("\n\n")[-1],
    )
    ap.add_argument("--point", required=True, help="JSON: arch, size, tokens, mixture, seed")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--shards", default="data/shards")
    ap.add_argument("--codebook", default="data/codebook/codebook.pt")
    ap.add_argument("--workdir", default="results")
    ap.add_argument("--fail-at-step", type=int, default=None, help="test hook: NaN loss there")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    params = load_params(args.params)
    point = Point.from_dict(json.loads(args.point))
    torch.set_num_threads(params.train.threads)
    codebook = Path(args.codebook) if Path(args.codebook).exists() else None
    rec = train_point(
        point,
        params,
        shards=Path(args.shards),
        codebook=codebook,
        workdir=Path(args.workdir),
        fail_at_step=args.fail_at_step,
    )
    print(json.dumps(rec, sort_keys=True))
    return 0


def iter_records(workdir: Path) -> Iterator[dict[str, Any]]:
    for path in sorted((Path(workdir) / "points").glob("*/record.json")):
        yield json.loads(path.read_text())


if __name__ == "__main__":
    sys.exit(main())
