"""MoEFFN equals a per-expert Python loop (values and gradients), routes dropless, balances.

``moe_loop`` is the oracle: the textbook definition, one expert at a time, written without
the module's sort/grouped-matmul dispatch. ``bench/moe_speed.py`` times it too.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from model.config import MoEConfig
from model.flop_formulas import register_flop_formulas
from model.layers import SwiGLU
from model.moe import MoEFFN, grouped_mm_works

DIM, HIDDEN = 16, 24  # multiples of 4: grouped_mm's 16-byte stride rule holds in fp32
IMPLS = ["bmm", "grouped_mm"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matmuls: intra-op threads only add overhead (seconds on a busy 2-core box)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def moe_loop(m: MoEFFN, x: Tensor, is_image: Tensor | None = None) -> Tensor:
    """Oracle: route each token, then loop over experts and sum gate * SwiGLU_e(x) per token."""
    cfg = m.cfg
    xf = x.reshape(-1, m.dim)  # (N, dim)
    logits = F.linear(xf, m.router.weight).to(torch.promote_types(x.dtype, torch.float32))
    if cfg.modality_aware:
        img = is_image.reshape(-1)[:, None]  # (N, 1)
        img_expert = torch.arange(cfg.n_experts) < cfg.n_image_experts  # (E,)
        logits = torch.where(img == img_expert, logits, float("-inf"))
    probs = logits.softmax(-1)
    gate, idx = probs.topk(cfg.top_k, dim=-1)  # (N, k)
    if cfg.top_k > 1:
        gate = gate / gate.sum(-1, keepdim=True)
    y = torch.zeros_like(xf)
    for e in range(cfg.n_experts):
        tok, slot = (idx == e).nonzero(as_tuple=True)
        xe = xf[tok]
        ye = (F.silu(xe @ m.w1[e]) * (xe @ m.w3[e])) @ m.w2[e]
        y = y.index_add(0, tok, ye * gate[tok, slot, None].to(ye.dtype))
    return y.view_as(x)


def make(
    impl: str = "auto",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    **cfg,
) -> MoEFFN:
    if impl == "grouped_mm" and not grouped_mm_works("cpu", dtype):
        pytest.skip(f"torch._grouped_mm (fwd+bwd) unavailable on cpu/{dtype}")
    torch.manual_seed(seed)
    cfg = {"n_experts": 8, "top_k": 1, **cfg}
    return MoEFFN(DIM, HIDDEN, MoEConfig(**cfg), impl=impl).to(dtype)


def tokens(shape=(3, 11), dtype=torch.float32, seed=1) -> Tensor:
    """x with a constant feature 0 = 1, so router column 0 acts as a per-expert bias."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, DIM, generator=g, dtype=dtype)
    x[..., 0] = 1.0
    return x


def bias_router(m: MoEFFN, bias: dict[int, float]) -> None:
    with torch.no_grad():
        for e, b in bias.items():
            m.router.weight[e, 0] = b


def assert_matches_oracle(m: MoEFFN, x: Tensor, is_image: Tensor | None = None) -> None:
    """Values and grads wrt x, w1, w2, w3 and the router weight equal the loop's."""
    tol = (
        {"rtol": 1e-5, "atol": 1e-6} if x.dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-12}
    )
    params = [m.w1, m.w2, m.w3, m.router.weight]
    dy = torch.randn(x.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(2))
    grads = []
    for fn in (lambda x_: m(x_, is_image)[0], lambda x_: moe_loop(m, x_, is_image)):
        x_ = x.detach().clone().requires_grad_()
        y = fn(x_)
        grads.append((y, *torch.autograd.grad(y, [x_, *params], dy)))
    names = ["y", "x", "w1", "w2", "w3", "router"]
    for name, a, b in zip(names, *grads, strict=True):
        torch.testing.assert_close(a, b, **tol, msg=lambda s, n=name: f"{n}: {s}")
    assert grads[0][-1].abs().sum() > 0, "router gets no gradient through the gates"


# --- equivalence with the oracle ----------------------------------------------------------


# fp64 has no _grouped_mm kernel: that case is covered by the fallback test below, not skipped
CASES = [
    (impl, dtype)
    for impl in IMPLS
    for dtype in (torch.float32, torch.float64)
    if impl != "grouped_mm" or grouped_mm_works("cpu", dtype)
]


@pytest.mark.parametrize(("impl", "dtype"), CASES)
@pytest.mark.parametrize("top_k", [1, 2])
def test_matches_oracle_uneven_and_empty_experts(impl, top_k, dtype):
    m = make(impl, dtype, top_k=top_k)
    bias_router(m, {0: -30.0, 3: -30.0, 7: -30.0, 5: 1.5})  # experts 0, 3, 7 get no tokens
    x = tokens(dtype=dtype)
    counts = torch.bincount(
        m.route(x.reshape(-1, DIM), x.new_zeros(33).bool())[3].flatten(), minlength=8
    )
    assert counts[[0, 3, 7]].sum() == 0 and counts.max() > counts[counts > 0].min(), counts
    assert_matches_oracle(m, x)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("top_k", [1, 2])
def test_dropless_when_all_tokens_pick_one_expert(impl, top_k):
    m = make(impl, top_k=top_k)
    bias_router(m, {2: 40.0})
    x = tokens()
    _, aux = m(x)
    assert aux["load"][2] == pytest.approx(1 / top_k)  # every token has expert 2 in its top-k
    assert_matches_oracle(m, x)


def test_single_expert_is_the_dense_swiglu():
    """E=1: the gate is softmax of one logit = 1, so MoE == SwiGLU with the same weights."""
    m, dense = make(n_experts=1), SwiGLU(DIM, HIDDEN)
    with torch.no_grad():
        for name in ("w1", "w2", "w3"):
            getattr(dense, name).weight.copy_(getattr(m, name)[0].T)
    x = tokens()
    torch.testing.assert_close(m(x)[0], dense(x))


@pytest.mark.parametrize("impl", IMPLS)
def test_shapes_BLD_and_ND_agree(impl):
    m = make(impl, top_k=2)
    x = tokens((4, 9))
    y3, aux3 = m(x)
    y2, aux2 = m(x.reshape(-1, DIM))
    assert y3.shape == x.shape and y2.shape == (36, DIM)
    torch.testing.assert_close(y3.reshape(-1, DIM), y2)
    torch.testing.assert_close(aux3["load"], aux2["load"])


def test_auto_falls_back_to_bmm_and_forced_grouped_mm_refuses():
    x = tokens(dtype=torch.float64)
    y, _ = make("auto", torch.float64)(x)  # no fp64 grouped_mm kernel: auto uses bmm
    assert y.dtype == torch.float64
    if not grouped_mm_works("cpu", torch.float64):
        with pytest.raises(ValueError, match="grouped_mm"):
            make("grouped_mm", torch.float32).double()(x)
    with pytest.raises(ValueError, match="impl"):
        MoEFFN(DIM, HIDDEN, MoEConfig(), impl="loop")


# --- load balancing ------------------------------------------------------------------------


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("modality_aware", [False, True])
def test_load_balancing_loss_is_one_for_uniform_router(top_k, modality_aware):
    m = make(top_k=top_k, modality_aware=modality_aware, aux_loss_weight=0.01)
    torch.nn.init.zeros_(m.router.weight)  # uniform probs; top-k ties pick any expert
    x = tokens()
    is_image = torch.arange(33).reshape(3, 11) % 3 == 0
    _, aux = m(x, is_image)
    assert aux["lb_loss"].item() == pytest.approx(1.0, abs=1e-6)
    assert aux["aux_loss"].item() == pytest.approx(0.01, abs=1e-8)  # z_loss_weight=0


def test_load_balancing_loss_grows_with_skew_and_trains_the_router():
    m = make(z_loss_weight=1e-3)
    x = tokens()
    lbs = []
    for b in (0.0, 2.0, 40.0):
        bias_router(m, {4: b})
        lbs.append(m(x)[1]["lb_loss"].item())
    assert 1.0 <= lbs[0] < lbs[1] < lbs[2]
    assert lbs[2] == pytest.approx(8.0, rel=1e-3)  # all tokens on one expert with prob ~1
    m.router.weight.grad = None
    aux = m(x)[1]
    aux["aux_loss"].backward()
    assert m.router.weight.grad.abs().sum() > 0
    expect = 0.01 * aux["lb_loss"] + 1e-3 * aux["z_loss"]
    torch.testing.assert_close(aux["aux_loss"].detach(), expect)


def test_learned_routing_shows_bias_in_load():
    m = make()
    bias_router(m, {5: 3.0})
    is_image = torch.rand(3, 11, generator=torch.Generator().manual_seed(3)) < 0.5
    _, aux = m(tokens(), is_image)
    assert aux["load"].argmax() == 5 and aux["load"][5] > 0.5
    for key in ("load", "image_frac", "text_frac"):
        assert aux[key].sum().item() == pytest.approx(1.0)
    assert aux["image_frac"][5] > 0.5 and aux["text_frac"][5] > 0.5  # modality-agnostic


# --- modality-aware routing ------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("top_k", [1, 2])
def test_modality_aware_routes_within_group(impl, top_k):
    m = make(impl, top_k=top_k, modality_aware=True, image_experts=3)
    bias_router(m, {6: 40.0})  # a text expert every token would pick if it could
    x = tokens()
    is_image = torch.rand(3, 11, generator=torch.Generator().manual_seed(4)) < 0.4
    *_, idx = m.route(x.reshape(-1, DIM), is_image.reshape(-1))
    img = is_image.reshape(-1)
    assert (idx[img] < 3).all() and (idx[~img] >= 3).all()
    _, aux = m(x, is_image)
    assert (aux["image_frac"][3:] == 0).all() and (aux["text_frac"][:3] == 0).all()
    assert aux["image_frac"].sum().item() == pytest.approx(1.0)
    assert aux["text_frac"][6].item() == pytest.approx(1 / top_k)
    assert_matches_oracle(m, x, is_image)


def test_modality_aware_needs_is_image():
    m = make(modality_aware=True)
    with pytest.raises(ValueError, match="is_image"):
        m(tokens())


@pytest.mark.parametrize("impl", ["auto", "bmm"])
def test_empty_batch_and_plain_sum_backward(impl):
    """No tokens: auto falls back to bmm. ``y.sum()`` sends an expanded (stride-0) grad back,
    which ``_grouped_mm``'s backward rejects unless the graph materialises it first."""
    m = make(impl, top_k=2)
    x = torch.zeros(0, DIM, requires_grad=True)
    y, aux = m(x)
    (y.sum() + aux["aux_loss"]).backward()
    assert y.shape == (0, DIM) and aux["load"].sum() == 0
    x = tokens().requires_grad_()
    m(x)[0].sum().backward()
    assert x.grad.abs().sum() > 0


@pytest.mark.parametrize("impl", IMPLS)
def test_flop_counter_sees_the_experts(impl):
    """top-1 fwd+bwd costs what the dense SwiGLU does, plus the router (bmm: plus padding)."""
    from torch.utils.flop_counter import FlopCounterMode

    register_flop_formulas()
    m, x = make(impl), tokens().requires_grad_()
    with FlopCounterMode(display=False) as fc:
        m(x)[0].sum().backward()
    N, E = x.shape[0] * x.shape[1], m.cfg.n_experts
    dense = 3 * 3 * 2 * N * DIM * HIDDEN  # 3 matmuls, fwd + 2 bwd, 2 FLOPs per MAC
    router = 3 * 2 * N * DIM * E  # fwd, dx, dW
    if impl == "grouped_mm":
        assert fc.get_total_flops() == dense + router
    else:  # bmm counts the zero rows padded up to the busiest expert
        assert fc.get_total_flops() >= dense + router


@pytest.mark.parametrize("impl", IMPLS)
def test_bf16_autocast_runs_the_experts_in_bf16_and_returns_fp32(impl):
    """As on GPU (bf16 autocast): the experts compute in bf16 (autocast skips _grouped_mm, so
    the layer casts), the combine stays fp32, and the result is the fp32 one within bf16 error.
    (Before: the bmm path failed in index_add_, grouped_mm silently ran in fp32.)"""
    if impl == "grouped_mm" and not grouped_mm_works("cpu", torch.bfloat16):
        pytest.skip("torch._grouped_mm (fwd+bwd) unavailable on cpu/bf16")
    m = make(impl, top_k=2)
    x = tokens().requires_grad_()
    ref = m(x)[0]
    seen = []
    hook = torch.nn.functional.silu
    try:
        torch.nn.functional.silu = lambda h: seen.append(h.dtype) or hook(h)
        with torch.autocast("cpu", torch.bfloat16):
            y, aux = m(x)
    finally:
        torch.nn.functional.silu = hook
    assert y.dtype == torch.float32 and seen == [torch.bfloat16]
    torch.testing.assert_close(y, ref, rtol=0.05, atol=0.02)
    (y.square().sum() + aux["aux_loss"]).backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in (m.w1, m.w2, m.w3))


def test_the_grouped_mm_probe_inside_a_checkpointed_block_and_under_no_grad():
    """The kernel probe runs on the first MoE call, wherever that is: inside a block under
    activation checkpointing (its tensors are not the block's: the recomputation, which finds
    the answer cached, saves as many) and under no_grad (it still probes with gradients)."""
    from torch.utils.checkpoint import checkpoint

    grouped_mm_works.cache_clear()
    with torch.no_grad():
        first = grouped_mm_works("cpu", torch.float32)
    grouped_mm_works.cache_clear()
    assert grouped_mm_works("cpu", torch.float32) == first
    grouped_mm_works.cache_clear()
    ffn = MoEFFN(16, 32, MoEConfig(n_experts=4, top_k=1))
    x = torch.randn(2, 8, 16, requires_grad=True)
    y, aux = checkpoint(ffn, x, use_reentrant=False)
    (y.sum() + aux["aux_loss"]).backward()  # raised CheckpointError when the probe ran inside
    assert x.grad is not None and ffn.w1.grad is not None
