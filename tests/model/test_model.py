"""model/: every architecture builds, trains, masks correctly, counts N and FLOPs, round-trips."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from model.archs import VARIANTS
from model.config import ModelConfig, MoEConfig
from model.counting import count_params, step_flops, training_compute
from model.discrete import VisualCodebook
from model.flop_formulas import register_flop_formulas
from model.model import MultimodalLM, load_model, save_model
from model.sizes import LADDER, config_for_width, size_config
from stages.data.loader import PackedLoader
from stages.data.shard_format import load_info

MIX = {"caption": 0.45, "interleaved": 0.45, "text": 0.10}
B, L = 4, 64
SMALL_MOE = MoEConfig(n_experts=4, top_k=1)
# every registered variant (model/archs.py), plus MoE settings the registry does not name
ARCHS = {name: (name, SMALL_MOE) for name in VARIANTS} | {
    "early-moe-top2": ("early-moe", MoEConfig(n_experts=4, top_k=2, z_loss_weight=1e-3)),
}


@pytest.fixture(scope="module")
def batch(tiny_data):
    return PackedLoader(tiny_data.shards, B, L, MIX, seed=0).next_batch()


def tiny_config(tiny_data, name: str = "early") -> ModelConfig:
    info = load_info(tiny_data.shards)
    base = ModelConfig(
        vocab_size=info["vocab_size"],
        context_length=L,
        image_size=info["image_size"],
        patch_size=info["patch_size"],
        codebook_size=16,
        special_ids=info["special_ids"],
    )
    variant, moe = ARCHS[name]
    return config_for_width(32, VARIANTS[variant].config(base, moe))


def build(tiny_data, name: str, seed: int = 0) -> MultimodalLM:
    torch.manual_seed(seed)
    cfg = tiny_config(tiny_data, name)
    codebook = None
    if cfg.arch == "discrete":
        codes = torch.randn(
            cfg.codebook_size, cfg.patch_dim, generator=torch.Generator().manual_seed(0)
        )
        codebook = VisualCodebook(codes.clamp(-1, 1), cfg.patch_size)
    return MultimodalLM(cfg, codebook)


@pytest.mark.parametrize("name", list(ARCHS))
def test_forward_backward_and_overfit_one_batch(tiny_data, batch, name):
    model = build(tiny_data, name)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    out = model(batch)
    assert torch.isfinite(out.loss) and out.n_targets == int(batch.loss_mask.sum())
    first = out.loss.item()
    assert abs(first - torch.log(torch.tensor(float(model.cfg.vocab_size))).item()) < 1.0
    for _ in range(40):
        out = model(batch)
        out.total.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert out.loss.item() < 0.5 * first, (name, first, out.loss.item())
    if model.cfg.moe is not None:
        assert len(out.moe) == model.cfg.n_layers and out.aux_loss > 0


def _perturb_token(batch, row, pos, vocab):
    b = dataclasses.replace(batch, tokens=batch.tokens.clone())
    b.tokens[row, pos] = (b.tokens[row, pos] + 7) % vocab
    return b


def _text_position(batch, special, row=0, after=10):
    """A text position in ``row`` (not an image or special token) at or after ``after``."""
    toks = batch.tokens[row]
    for p in range(after, len(toks) - 2):
        if toks[p] >= 6 and batch.doc_ids[row, p] == batch.doc_ids[row, p + 1]:
            return p
    raise AssertionError("no text position")


@pytest.mark.parametrize("name", ["early", "late", "discrete", "early-moe"])
def test_changing_a_later_text_token_leaves_earlier_outputs_unchanged(tiny_data, batch, name):
    model = build(tiny_data, name).eval()
    p = _text_position(batch, model.cfg.special_ids)
    with torch.no_grad():
        h0, _ = model.hidden_states(batch)
        h1, _ = model.hidden_states(_perturb_token(batch, 0, p, model.cfg.vocab_size))
    assert torch.equal(h0[0, :p], h1[0, :p])
    assert not torch.allclose(h0[0, p], h1[0, p])
    assert torch.equal(h0[1:], h1[1:])  # other rows untouched


@pytest.mark.parametrize("name", ["early", "late"])
def test_changing_a_patch_changes_earlier_patches_of_the_same_image(tiny_data, batch, name):
    model = build(tiny_data, name).eval()
    T, p = model.cfg.image_tokens, model.cfg.patch_size
    row, start = batch.image_index[0].tolist()
    images = batch.images.clone()
    images[0, :, -p:, -p:] = 255 - images[0, :, -p:, -p:]  # the image's last patch
    with torch.no_grad():
        h0, _ = model.hidden_states(batch)
        h1, _ = model.hidden_states(dataclasses.replace(batch, images=images))
    assert not torch.allclose(h0[row, start], h1[row, start])  # first patch sees the last
    assert torch.equal(h0[row, : start - 1], h1[row, : start - 1])  # before <boi>: causal
    assert not torch.allclose(h0[row, start + T + 1], h1[row, start + T + 1])  # text after


def test_nothing_crosses_a_packed_document_boundary(tiny_data, batch):
    model = build(tiny_data, "early").eval()
    # a row with at least two documents
    row = next(r for r in range(B) if len(torch.unique(batch.doc_ids[r])) >= 2)
    d = batch.doc_ids[row]
    second = int(torch.nonzero(d != d[0])[0])  # first position of the next document
    with torch.no_grad():
        h0, _ = model.hidden_states(batch)
        h1, _ = model.hidden_states(_perturb_token(batch, row, 1, model.cfg.vocab_size))
    assert not torch.allclose(h0[row, 1], h1[row, 1])
    assert torch.equal(h0[row, second:], h1[row, second:])


@pytest.mark.parametrize("name", list(ARCHS))
def test_counted_parameters_equal_the_modules_numel(tiny_data, name):
    model = build(tiny_data, name)
    c, cfg = count_params(model.cfg), model.cfg
    named = dict(model.named_parameters())
    emb = named["tok_emb.weight"].numel() + named["lm_head.weight"].numel()
    vision = sum(p.numel() for n, p in named.items() if n.startswith("vision."))
    total = sum(p.numel() for p in named.values())
    assert c.N_total == total and c.N_embedding == emb and c.N_v == vision
    inactive = 0
    if cfg.moe is not None:  # experts a token does not use
        per_expert = 3 * cfg.d_model * cfg.ffn_hidden
        inactive = cfg.n_layers * (cfg.moe.n_experts - cfg.moe.top_k) * per_expert
    assert total - emb - vision - inactive == c.N
    if cfg.arch == "late":
        assert training_compute(cfg, 1000, 200) == 6 * (c.N_v * 200 + c.N * 1000)
    else:
        assert training_compute(cfg, 1000) == 6 * c.N * 1000


@pytest.mark.parametrize("name", ["early", "late", "discrete", "early-moe"])
def test_counted_flops_agree_with_flop_counter(tiny_data, batch, name):
    register_flop_formulas()
    model = build(tiny_data, name)
    with FlopCounterMode(display=False) as fc:
        model(batch).total.backward()
    expected = step_flops(model.cfg, B, L, int(batch.loss_mask.sum()), len(batch.images))
    measured = fc.get_total_flops()
    assert abs(measured - expected) / measured < 0.10, (measured, expected)


@pytest.mark.parametrize("name", ["early", "late", "discrete", "early-moe"])
def test_weights_round_trip_bit_identically(tiny_data, batch, name, tmp_path):
    model = build(tiny_data, name).eval()
    save_model(model, tmp_path / "m.pt")
    torch.load(tmp_path / "m.pt", weights_only=True)  # loads without pickled code
    again = load_model(tmp_path / "m.pt").eval()
    with torch.no_grad():
        assert torch.equal(model(batch).loss, again(batch).loss)
        assert torch.equal(model.hidden_states(batch)[0], again.hidden_states(batch)[0])


def test_the_size_ladder_is_smooth_and_answers_a_target_n():
    ns = [count_params(size_config(s)).N for s in LADDER]
    assert ns == sorted(ns)
    ratios = [b / a for a, b in zip(ns, ns[1:], strict=False)]
    assert all(1.5 < r < 3.5 for r in ratios), ratios
    for s in LADDER:
        cfg = size_config(s)
        assert cfg.n_layers == size_config("xxs").n_layers  # depth fixed, width grows
        assert cfg.enc_d_model == max(16, round(cfg.d_model / 2 / 16) * 16)
    target = count_params(size_config("m")).N
    assert size_config(target * 1.05) == size_config("m")
    with pytest.raises(ValueError, match="allowed"):
        size_config("huge")


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="top_k"):
        MoEConfig(n_experts=4, top_k=5)
    with pytest.raises(ValueError, match="discrete"):
        MultimodalLM(ModelConfig(arch="discrete"))
    with pytest.raises(ValueError, match="patch_size"):
        ModelConfig(image_size=30, patch_size=8)
