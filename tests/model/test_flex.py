"""FlexAttention's block mask computes the attention the SDPA path does (model/decoder.py): causal
text, bidirectional inside each image, never across a packed document, on real packed batches
of the test shards; outputs and gradients equal to 1e-5.

torch 2.13's public ``flex_attention`` refuses a backward pass on CPU (NotImplementedError, a
device check before anything runs), so the gradient tests call the operator it wraps
(``torch._higher_order_ops.flex_attention``, the eager path it takes on a GPU without compile,
with the same block mask); outputs are also checked through the public function, eager and
compiled by inductor for this CPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch._higher_order_ops.flex_attention import flex_attention as flex_op
from torch.nn.attention.flex_attention import flex_attention

import model.decoder
from flows.config import Point, RunConfig
from model.decoder import attention_mask, flex_mask
from model.discrete import VisualCodebook
from model.model import MultimodalLM
from stages.data.loader import PackedLoader, load_info
from tests.flows.test_memory import MIX, _params


def _batch(tiny_data, rows=3, ctx=200):
    """Rows of several packed documents with images (200: not a multiple of the 128 block)."""
    return PackedLoader(tiny_data.shards, rows, ctx, MIX, seed=5).next_batch()


def _tokens_per_image(tiny_data) -> int:
    info = load_info(tiny_data.shards)
    point = Point("early", "xxs", 10**5, "45-45-10", 0)
    return RunConfig.build(_params(tiny_data), point, info).model.image_tokens


def _image_ids(batch, tokens_per_image: int) -> torch.Tensor:
    ids = torch.full(batch.tokens.shape, -1, dtype=torch.long)
    for m, (row, col) in enumerate(batch.image_index.tolist()):
        ids[row, col : col + tokens_per_image] = m
    return ids


def test_the_block_mask_allows_exactly_what_the_dense_mask_allows(tiny_data):
    batch = _batch(tiny_data)
    image_ids = _image_ids(batch, _tokens_per_image(tiny_data))
    dense = attention_mask(batch.doc_ids, image_ids)
    block = flex_mask(batch.doc_ids, image_ids, compiled=False)
    assert len(batch.images) > 1 and batch.doc_ids.max() > batch.doc_ids.min()  # a real test
    B, L = batch.doc_ids.shape
    allowed = block.mask_mod(
        torch.arange(B)[:, None, None, None], 0,
        torch.arange(L)[None, None, :, None], torch.arange(L)[None, None, None, :],
    )  # fmt: skip
    assert torch.equal(allowed, dense)
    assert (~dense).any() and dense.any()  # both kinds of pair occur


def _flex_with_backward(q, k, v, block_mask):
    """FlexAttention as the public function computes it, with a backward on CPU (see above)."""
    out, *_ = flex_op(q, k, v, lambda s, b, h, i, j: s, block_mask.as_tuple(),
                      q.shape[-1] ** -0.5, None)  # fmt: skip
    return out


def _qkv(batch, grad: bool):
    B, L = batch.doc_ids.shape
    g = torch.Generator().manual_seed(0)
    return [torch.randn(B, 2, L, 16, generator=g, requires_grad=grad) for _ in range(3)]


@pytest.mark.parametrize("compiled", [False, True])
def test_flex_attention_outputs_equal_masked_sdpa(tiny_data, compiled, monkeypatch, tmp_path):
    """``compiled``: Inductor builds its kernels in a cache folder of this test's own. Its
    default folder (/tmp/torchinductor_<user>) is shared by every process of the machine, and a
    test process's CPU kernel variables change when a grid test pins them (flows/devices.py).
    On an AVX-512 machine, kernels read from there (built by earlier test processes) gave
    outputs 99% off (torch 2.13.0); built afresh they are exact, pinned or not."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    batch = _batch(tiny_data)
    image_ids = _image_ids(batch, _tokens_per_image(tiny_data))
    q, k, v = _qkv(batch, grad=False)
    ref = F.scaled_dot_product_attention(
        q, k, v, attn_mask=attention_mask(batch.doc_ids, image_ids)
    )
    fn = torch.compile(flex_attention) if compiled else flex_attention
    out = fn(q, k, v, block_mask=flex_mask(batch.doc_ids, image_ids, compiled=compiled))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_flex_attention_gradients_equal_masked_sdpa(tiny_data):
    batch = _batch(tiny_data)
    image_ids = _image_ids(batch, _tokens_per_image(tiny_data))
    q, k, v = _qkv(batch, grad=True)
    ref = F.scaled_dot_product_attention(
        q, k, v, attn_mask=attention_mask(batch.doc_ids, image_ids)
    )
    g = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    out = _flex_with_backward(q, k, v, flex_mask(batch.doc_ids, image_ids, compiled=False))
    grads = torch.autograd.grad(out, (q, k, v), g)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["early", "late", "discrete", "early-moe"])
def test_a_model_with_flex_attention_gives_the_sdpa_losses_and_gradients(
    tiny_data, arch, monkeypatch
):
    monkeypatch.setattr(model.decoder, "flex_attention", _flex_with_backward)
    info = load_info(tiny_data.shards)
    params = _params(tiny_data)
    cfg = RunConfig.build(params, Point(arch, "xs", 10**5, "45-45-10", 0), info).model
    codebook = None
    if arch == "discrete":  # any codebook of the configured size: the mask is what is tested
        g = torch.Generator().manual_seed(2)
        codes = torch.rand(cfg.codebook_size, cfg.patch_dim, generator=g) * 2 - 1
        codebook = VisualCodebook(codes, cfg.patch_size)
    batch = PackedLoader(tiny_data.shards, 4, 128, MIX, seed=3).next_batch()
    results = []
    for kind in ("sdpa", "flex"):
        torch.manual_seed(0)
        lm = MultimodalLM(cfg, codebook)
        lm.set_attention(kind)
        out = lm(batch)
        out.total.backward()
        results.append((out.loss.detach(), {n: p.grad for n, p in lm.named_parameters()}))
    (l0, g0), (l1, g1) = results
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)
    assert g0.keys() == g1.keys()
    for name in g0:
        assert (g0[name] is None) == (g1[name] is None), name
        if g0[name] is not None:
            torch.testing.assert_close(g1[name], g0[name], rtol=1e-5, atol=1e-6, msg=name)


def test_an_unknown_attention_names_the_allowed_ones(tiny_data):
    cfg = RunConfig.build(
        _params(tiny_data), Point("early", "xxs", 10**5, "45-45-10", 0), load_info(tiny_data.shards)
    ).model
    with pytest.raises(ValueError, match="sdpa or flex"):
        MultimodalLM(cfg).set_attention("flash")


def test_flex_attention_on_a_cpu_is_refused_before_any_work(tiny_data):
    """torch's FlexAttention has no backward pass on a CPU: the grid refuses such a study when
    it assigns devices, and a point process when it builds its model."""
    from flows.devices import device_slots
    from flows.training.run import Run
    from stages.params import ParamsError

    params = _params(tiny_data, attention="flex", device="cpu")
    with pytest.raises(ParamsError, match="train.attention is 'flex'.*train.attention: sdpa"):
        device_slots(params)
    cfg = RunConfig.build(params, Point("early", "xxs", 10**5, "45-45-10", 0), None)
    with pytest.raises(ParamsError, match="no backward pass on a CPU"):
        Run(cfg, tiny_data.shards, None, {"fingerprint": "x", "git_revision": "x"})
