"""Parameter and FLOP counts, in one place: every scaling-law exponent is only as good as N and C.

Conventions (paper §2.1 and App. C, following Kaplan et al. / Hoffmann et al.):

- ``N``: non-embedding parameters of the decoder that a token uses: the blocks and final norm,
  plus early fusion's patch projection; for MoE only the *active* ones (router + top_k experts
  per layer). The token embedding and the output head are excluded, unless a study counts
  them as the paper's Table 6 does (``model.count_embeddings``: ``count_params(cfg, True)``).
- ``N_v``: late fusion's vision side (patch embedding, positions, ViT encoder, connector),
  reported separately. ``N_total``: every parameter (all experts, embeddings, head).
- ``C`` (training compute, paper convention): ``6·N·D`` for early, discrete and MoE, and
  ``6·(N_v·D_v + N·D)`` for late fusion, where D counts the tokens the decoder sees and D_v the
  image tokens the encoder sees.
- :func:`step_flops` is the finer count of one forward+backward pass that MFU uses: every matmul
  including attention scores, the output head on text targets, and the vision side.
"""

from __future__ import annotations

from dataclasses import dataclass

from model.config import ModelConfig


@dataclass(frozen=True)
class Counts:
    N: int  # active non-embedding decoder parameters
    N_v: int  # vision encoder + connector (late fusion), else 0
    N_total: int  # every parameter
    N_embedding: int  # token embedding + output head


def _block(d: int, heads: int, hidden: int) -> tuple[int, int]:
    """(parameters, matmul parameters) of one dense pre-norm block."""
    matmul = 4 * d * d + 3 * d * hidden
    return matmul + 2 * (d // heads) + 2 * d, matmul


def _decoder_layer(cfg: ModelConfig) -> tuple[int, int, int]:
    """(active params, active matmul params, total params) of one decoder block."""
    d, h = cfg.d_model, cfg.ffn_hidden
    dense, dense_mm = _block(d, cfg.n_heads, h)
    if cfg.moe is None:
        return dense, dense_mm, dense
    ffn, router = 3 * d * h, d * cfg.moe.n_experts
    active = dense + router + (cfg.moe.top_k - 1) * ffn
    return (
        active,
        dense_mm + router + (cfg.moe.top_k - 1) * ffn,
        active + (cfg.moe.n_experts - cfg.moe.top_k) * ffn,
    )


def _vision(cfg: ModelConfig) -> tuple[int, int]:
    """(parameters, matmul parameters per image token) of late fusion's encoder + connector."""
    e, d = cfg.enc_d_model, cfg.d_model
    blk, blk_mm = _block(e, cfg.enc_heads, cfg.enc_ffn_hidden)
    connector_mm = e * d + d * d
    params = (
        cfg.patch_dim * e
        + e  # patch embedding
        + cfg.image_tokens * e  # learned positions
        + cfg.enc_layers * blk
        + e  # blocks + final norm
        + connector_mm
        + 2 * d  # connector with biases
    )
    return params, cfg.patch_dim * e + cfg.enc_layers * blk_mm + connector_mm


def count_params(cfg: ModelConfig, with_embeddings: bool = False) -> Counts:
    """The counts of ``cfg``; ``with_embeddings``: N also counts the token embedding and the
    output head (the paper's Table 6 convention; ours by default leaves them out)."""
    active, _, total = _decoder_layer(cfg)
    n = cfg.n_layers * active + cfg.d_model
    n_total_dec = cfg.n_layers * total + cfg.d_model
    if cfg.arch == "early":
        n += cfg.patch_dim * cfg.d_model + cfg.d_model
        n_total_dec += cfg.patch_dim * cfg.d_model + cfg.d_model
    n_v = _vision(cfg)[0] if cfg.arch == "late" else 0
    emb = cfg.total_vocab * cfg.d_model + cfg.d_model * cfg.vocab_size
    n += emb if with_embeddings else 0
    return Counts(N=n, N_v=n_v, N_total=n_total_dec + n_v + emb, N_embedding=emb)


def flops_per_token(cfg: ModelConfig, context: int | None = None) -> float:
    """Training FLOPs per decoder token: 6·N plus the attention term 12·n_layers·d·context.

    (Kaplan et al. 2020, Table 1, with the attention over the whole packed row, which is what
    SDPA with a mask computes.) The output head and the vision side are in :func:`step_flops`.
    """
    ctx = context or cfg.context_length
    return 6 * count_params(cfg).N + 12 * cfg.n_layers * cfg.d_model * ctx


def step_flops(cfg: ModelConfig, batch: int, context: int, targets: int, images: int) -> float:
    """Forward + backward matmul *model* FLOPs of one step (PaLM's MFU convention).

    Agrees with ``torch.utils.flop_counter.FlopCounterMode`` to within 5-8% at our sizes: the
    gap is SDPA's flash backward, which recomputes the attention scores (torch counts 2.5x the
    forward for it, this count 2x, as model FLOPs exclude recomputation).
    """
    _, dec_mm, _ = _decoder_layer(cfg)
    tokens = batch * context
    f = 6 * tokens * cfg.n_layers * dec_mm  # weights
    f += 12 * cfg.n_layers * cfg.d_model * context * tokens  # attention scores and values
    f += 6 * targets * cfg.d_model * cfg.vocab_size  # output head, on text targets only
    image_tokens = images * cfg.image_tokens
    if cfg.arch == "early":
        f += 6 * image_tokens * cfg.patch_dim * cfg.d_model
    elif cfg.arch == "late":
        f += 6 * image_tokens * _vision(cfg)[1]
        f += 12 * cfg.enc_layers * cfg.enc_d_model * cfg.image_tokens * image_tokens
    elif cfg.arch == "discrete":  # nearest-code search, forward only (no gradient)
        f += 2 * image_tokens * cfg.patch_dim * cfg.codebook_size
    return float(f)


def training_compute(cfg: ModelConfig, D: float, D_v: float = 0.0) -> float:
    """C in the paper's convention: 6ND, or 6(N_v·D_v + N·D) for late fusion (App. C)."""
    c = count_params(cfg)
    return 6.0 * (c.N_v * D_v + c.N * D)
