"""What a point costs before it runs: memory per device and GPU-hours (``flows.grid plan``).

**Memory per device** (:func:`estimate`) is counted from the run config, term by term, for the
way the point trains: its processes, sharding (``none``: every process holds the whole model,
DDP; ``fsdp``: parameters, gradients and optimizer state split over the processes), activation
checkpointing, rows per pass (``micro_batch_rows``) and precision (fp32 on CPU; bf16 autocast
over fp32 parameters on GPU):

- *state*: fp32 parameters (4 bytes each), gradients (4) and AdamW's two moments (8), over the
  shards; plus DDP's gradient buckets (a second copy of the gradients, 4) when several processes
  hold whole models, the bf16 copies autocast keeps of the weights for the backward pass (2), or
  under FSDP the parameters it gathers (bf16 on GPUs, fp32 on CPUs) and the gradients it
  reduces, which depend on the moment (below);
- *activations*, what autograd saves for the backward pass, counted per token from what this
  code's blocks save (:func:`block_bytes_per_token`: the norms' inputs and outputs, q/k/v and
  their norms and rotations, the attention output and its log-sum-exp (SDPA's fused kernels
  keep no L x L scores), the FFN's three hidden tensors); all blocks, or with activation
  checkpointing each block's input plus one block recomputed; late fusion's encoder the same
  over the image tokens; plus the embeddings, the attention mask (SDPA's additive mask, B·L·L;
  FlexAttention's block mask, B·(L/128)² block indices), the final norm and the patches;
- *the peak*: the largest of the moments of the backward pass: the output head (logits, their
  log-softmax and its gradient over the text targets, with every saved activation still held),
  a block's backward (the saved activations, one block's gradients in flight, and every
  parameter gradient) and, under FSDP, the embeddings' (every gradient, the root's being
  reduced). FSDP's unsharded buffers differ by moment: the root's parameters (embeddings,
  output head) stay gathered through the step; in a block's backward it and the next block are
  gathered (prefetched), its gradients are unsharded and, on GPUs, where NCCL reduces
  asynchronously, the block before's reduce-scatter input is still in flight (gloo on CPUs
  reduces before the next block's backward starts: traced with the profiler).

tests/flows/test_memory.py measures the peak of real steps on CPU against this estimate (one
process, and each rank of FSDP over two; checkpointing on and off; python -m
flows.measure_memory does it for any run config, on CPUs or GPUs); docs/plan.md has the
numbers.

**GPU-hours** (:func:`gpu_hours`): the model FLOPs of every step (model/counting.py
``step_flops``: weights, attention, the output head, the vision side) over the stated peak and
MFU (params ``plan``). A point's own hours are those of its whole run; the hours a grid spends
count each group's shared trunk once (``gpu_hours_trained``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from flows.config import RunConfig
from model.config import ModelConfig
from model.counting import step_flops
from stages.params import Params, ParamsError

GIB = 2**30


def block_bytes_per_token(
    d: int, hidden: int, heads: int, bf16: bool, experts: int = 0, top_k: int = 1
) -> float:
    """Bytes one pre-norm block saves for backward per token, as measured on this code's blocks
    with autograd's saved-tensor hooks (tests/flows/test_memory.py checks the count): 15·d + 4·h
    + 3·heads + 2 elements for a dense block (the two norms' inputs, outputs and scales; q, k, v;
    q and k normed and rotated; the attention output, its log-sum-exp and the output
    projection's input; the FFN's four hidden tensors), and for MoE the router's logits and
    probabilities, the gathered, expert and gated tokens (3·k·d) and k·h per hidden tensor.

    fp32: 4 bytes an element. bf16 autocast (not measured here: no GPU): the residual stream,
    the norms' outputs and scales and the rotations' fp32 inputs at 4 bytes (8·d + 3·heads +
    2), the matmuls' outputs and inputs at 2."""
    k = top_k if experts else 1
    wide = 8 * d + 3 * heads + 2  # fp32 even under autocast
    narrow = 7 * d + 4 * hidden * k  # matmul outputs and inputs
    if experts:
        wide += 2 * experts + 6  # router logits and probabilities, int64 routing indices
        narrow += 3 * k * d
    return 4.0 * (wide + narrow) if not bf16 else 4.0 * wide + 2.0 * narrow


def _block_params(d: int, hidden: int, experts: int) -> int:
    return 4 * d * d + 3 * d * hidden * max(1, experts) + d * experts


@dataclass(frozen=True)
class Memory:
    """Bytes per device of one point (see the module docstring); ``total`` is the peak."""

    weights: float
    gradients: float
    optimizer: float
    buffers: float  # DDP buckets, autocast weight copies, or FSDP's gathered blocks
    activations: float  # saved for backward, at the peak moment
    transient: float  # the output head's or one block's gradients in flight at the peak
    precision: str

    @property
    def total(self) -> float:
        return (
            self.weights
            + self.gradients
            + self.optimizer
            + self.buffers
            + self.activations
            + self.transient
        )

    @property
    def gib(self) -> float:
        return self.total / GIB

    def as_dict(self) -> dict[str, float | str]:
        return {**asdict(self), "total": self.total}


def image_fraction(cfg: RunConfig, planned: float | None) -> float:
    """The share of image tokens in a batch: the shards' (in the config), else the one params
    ``plan.image_share`` states; 0 when neither is known."""
    return cfg.image_share if cfg.image_share is not None else (planned or 0.0)


def precision_of(cfg: RunConfig) -> str:
    """fp32 on CPU, bf16 autocast on a GPU (``auto`` is planned as a GPU: the plan sizes GPUs)."""
    return "fp32" if cfg.device == "cpu" else "bf16"


def estimate(
    cfg: RunConfig, image_share: float | None = None, precision: str | None = None
) -> Memory:
    """Peak bytes per device of ``cfg``'s training step (module docstring)."""
    m: ModelConfig = cfg.model
    precision = precision or precision_of(cfg)
    bf16 = precision == "bf16"
    world = cfg.processes
    shards = world if cfg.sharding == "fsdp" else 1
    P = cfg.counts.N_total
    E = m.moe.n_experts if m.moe else 0
    k = m.moe.top_k if m.moe else 1

    weights, grads, opt = 4.0 * P / shards, 4.0 * P / shards, 8.0 * P / shards
    emb = m.total_vocab * m.d_model
    fsdp = cfg.sharding == "fsdp" and world > 1
    moment_buffers: dict[str, float] = {}
    if fsdp:  # what FSDP holds unsharded at each moment of the backward pass (docstring)
        block = _block_params(m.d_model, m.ffn_hidden, E)
        root = emb + m.d_model * m.vocab_size
        p = 2.0 if bf16 else 4.0  # gathered parameters: bf16 on GPUs, fp32 on CPUs
        # in a block's backward: it and the next one gathered, its fp32 gradients, and on GPUs
        # (NCCL: asynchronous) the previous block's reduce-scatter input still in flight
        in_backward = p * root + (2 * p + 4 + (4 if bf16 else 0)) * block
        moment_buffers = {
            "output head": p * root,  # the root's parameters stay gathered through the step
            "top block": in_backward,
            "bottom block": in_backward,
            "embeddings": p * root + (4 + 4) * root,  # the root's gradients being reduced
        }
        buffers = 0.0
    else:
        buffers = 4.0 * P if world > 1 else 0.0  # DDP's gradient buckets
        buffers += 2.0 * (P - emb) if bf16 else 0.0  # autocast's bf16 weight copies

    rows, L = cfg.micro_batch_rows, cfg.context_length
    T = rows * L
    share = image_fraction(cfg, image_share)
    n_targets = (1.0 - share) * T
    images = share * T / m.image_tokens
    act = 2 if bf16 else 4

    per_tok = block_bytes_per_token(m.d_model, m.ffn_hidden, m.n_heads, bf16, E, k)
    img_tok = images * m.image_tokens
    if cfg.activation_checkpointing:  # each block's input (fp32 residual); one recomputed
        stored_all = m.n_layers * T * m.d_model * 4.0
        stored_one, recomputed = T * m.d_model * 4.0, per_tok * T
    else:
        stored_all, stored_one, recomputed = m.n_layers * per_tok * T, per_tok * T, 0.0
    misc = 2 * T * m.d_model * 4.0  # embedding output, with the image tokens put in
    if cfg.attention == "flex":  # block indices (4 int32 tables, each key- and query-side)
        misc += rows * 8 * 4.0 * math.ceil(L / 128) ** 2
    else:
        misc += rows * L * L * (4.0 + 1.0)  # the additive fp32 mask and the bool one it comes from
    misc += 2 * T * m.d_model * 4.0  # the final norm's input and output
    if m.arch in ("early", "late"):
        misc += 2 * img_tok * m.patch_dim * 4.0  # patches, normalised
    if m.arch == "late":  # the ViT encoder over the image tokens, and its connector
        enc = block_bytes_per_token(m.enc_d_model, m.enc_ffn_hidden, m.enc_heads, bf16)
        enc_all = (
            m.enc_layers * img_tok * (m.enc_d_model * 4.0 if cfg.activation_checkpointing else enc)
        )
        stored_all += enc_all
        stored_one += enc_all  # the encoder's backward comes after the decoder's
        misc += img_tok * (2 * m.enc_d_model + 3 * m.d_model) * act

    n_targets_vocab = n_targets * m.vocab_size
    head = n_targets_vocab * ((2 + 4) if bf16 else 4)  # logits (and their fp32 copy)
    head += n_targets_vocab * 4.0 * 2  # the log-softmax's output and its gradient
    head_grad = 4.0 * m.d_model * m.vocab_size
    in_flight = T * (2 * m.ffn_hidden * k + m.d_model) * act  # gradients inside one block
    moments = {  # what is live at the moments of the backward pass (besides the state)
        "output head": (stored_all + misc, head + head_grad, 0.0),
        "top block": (stored_all + misc + recomputed, in_flight + head_grad, 0.0),
        "bottom block": (stored_one + misc + recomputed, in_flight, grads),
        "embeddings": (0.0, 0.0, grads),
    }
    peak = max(moments, key=lambda at: sum(moments[at]) + moment_buffers.get(at, 0.0))
    activations, transient, grads = moments[peak]
    buffers += moment_buffers.get(peak, 0.0)
    parts = (weights, grads, opt, buffers, activations, transient)
    return Memory(*(float(x) for x in parts), precision)


def fits(cfg: RunConfig, limit_gib: float, image_share: float | None) -> bool:
    return estimate(cfg, image_share).gib <= limit_gib


def _rows_that_fit(cfg: RunConfig, limit: float, share: float | None) -> int | None:
    r = cfg.micro_batch_rows
    while r > 1:
        r //= 2
        if fits(cfg.with_(micro_batch_rows=r), limit, share):
            return r
    return None


def what_would_fit(cfg: RunConfig, params: Params) -> list[str]:
    """Changes to params that would make ``cfg`` fit ``plan.gpu_memory_gib``, cheapest first."""
    limit, share = params.plan.gpu_memory_gib, params.plan.image_share
    out = []
    if not cfg.activation_checkpointing and fits(
        cfg.with_(activation_checkpointing=True), limit, share
    ):
        out.append("train.activation_checkpointing: true")
    r = _rows_that_fit(cfg, limit, share)
    if r is not None:
        out.append(f"train.micro_batch_rows: {r} (accumulating gradients over passes)")
    rows = cfg.schedule.batch_rows
    for p in (2**i for i in range(1, 11)):
        if rows % p:
            break
        c = cfg.with_(
            processes=p, sharding="fsdp", micro_batch_rows=min(cfg.micro_batch_rows, rows // p)
        )
        if fits(c, limit, share) or fits(c.with_(activation_checkpointing=True), limit, share):
            ac = "" if fits(c, limit, share) else " with activation checkpointing"
            out.append(f"train.sharding: fsdp over train.processes: {p}{ac}")
            break
    need = estimate(cfg, share).gib
    out.append(f"a device with at least {math.ceil(need)} GiB (plan.gpu_memory_gib)")
    return out


def check_memory(configs: list[RunConfig], params: Params) -> None:
    """Before anything starts: every point fits ``plan.gpu_memory_gib``, or ParamsError naming
    the points that do not, their estimate and what would make them fit."""
    limit = params.plan.gpu_memory_gib
    bad: dict[str, tuple[RunConfig, float]] = {}
    for c in configs:
        need = estimate(c, params.plan.image_share).gib
        if need > limit:
            p = c.point
            key = f"{p.arch} {p.size}" + (f" e{p.experts}" if p.experts else "")
            if key not in bad or need > bad[key][1]:
                bad[key] = (c, need)
    if not bad:
        return
    lines = [
        f"{key}: {need:.1f} GiB > {limit:g} GiB; would fit with: "
        + "; or ".join(what_would_fit(c, params))
        for key, (c, need) in sorted(bad.items())
    ]
    raise ParamsError(
        f"{len(bad)} size(s) cannot fit plan.gpu_memory_gib={limit:g} GiB per device "
        "(flows/memory.py estimates the peak):\n  - " + "\n  - ".join(lines)
    )


# --------------------------------------------------------------------------- GPU-hours


def step_model_flops(cfg: RunConfig, image_share: float | None = None) -> float:
    """Model FLOPs of one optimizer step (the whole global batch)."""
    m = cfg.model
    T = cfg.batch_tokens
    share = image_fraction(cfg, image_share)
    images = share * T / m.image_tokens
    return step_flops(m, cfg.schedule.batch_rows, cfg.context_length, (1 - share) * T, images)


def gpu_hours(cfg: RunConfig, params: Params, steps: int | None = None) -> float:
    """GPU-hours of ``steps`` (default: all) of ``cfg`` at ``plan.gpu_peak_tflops`` x ``plan.mfu``."""
    pl = params.plan
    steps = cfg.schedule.steps if steps is None else steps
    seconds = steps * step_model_flops(cfg, pl.image_share) / (pl.gpu_peak_tflops * 1e12 * pl.mfu)
    return seconds / 3600.0


def trained_steps(configs: list[RunConfig]) -> list[int]:
    """The steps the grid trains for each point, each group's shared trunk counted once: a
    group's points in ascending budgets continue the trunk from the previous one's cooldown
    start, then cool down (flows/training/branching.py); without branching, every step."""
    out = [c.schedule.steps for c in configs]
    if not configs or not configs[0].branch_cooldowns:
        return out
    groups: dict[tuple, list[int]] = {}
    for i, c in enumerate(configs):
        p = c.point
        groups.setdefault((p.arch, p.size, p.mixture, p.seed, p.experts), []).append(i)
    for idx in groups.values():
        prev = 0
        for i in sorted(idx, key=lambda i: configs[i].schedule.cooldown_start):
            s = configs[i].schedule
            out[i] = (s.cooldown_start - prev) + (s.steps - s.cooldown_start)
            prev = s.cooldown_start
    return out
