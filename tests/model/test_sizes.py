"""model/sizes.py: one registry for the laptop ladder, the paper's Table 6 and width x depth
sizes; the paper's rows count what Table 6 says they count."""

from __future__ import annotations

import pytest

from model.config import ModelConfig, MoEConfig
from model.counting import count_params
from model.sizes import LADDER, PAPER, SIZES, ffn_hidden, heads, size, size_config

V = 50432  # DCLM's GPT-NeoX tokenizer, padded (the paper's vocabulary)
# Table 6 of the paper: early fusion (and MoE, active) parameters, and late fusion's two ends
TABLE6_EARLY = {"paper-275m": 275e6, "paper-468m": 468e6, "paper-932m": 932e6,
                "paper-1b6": 1.63e9, "paper-2b3": 2.28e9, "paper-3b4": 3.35e9}  # fmt: skip
TABLE6_LATE = {"paper-275m": 289e6, "paper-3b4": 3.7e9}
TABLE6_LR = {"paper-275m": 1.5e-3, "paper-468m": 1.5e-3, "paper-932m": 5e-4,
             "paper-1b6": 4.2e-4, "paper-2b3": 4e-4, "paper-3b4": 3.5e-4}  # fmt: skip


def _n(name: str, arch: str, moe: MoEConfig | None = None) -> int:
    c = count_params(size_config(name, ModelConfig(arch=arch, vocab_size=V, moe=moe)), True)
    return c.N + c.N_v


@pytest.mark.parametrize("name", PAPER)
def test_every_table6_count_is_within_3_percent(name):
    assert _n(name, "early") == pytest.approx(TABLE6_EARLY[name], rel=0.03)
    # MoE counts the active parameters: the router and one expert of eight (top-1)
    assert _n(name, "early", MoEConfig(8, 1)) == pytest.approx(TABLE6_EARLY[name], rel=0.03)
    if name in TABLE6_LATE:
        assert _n(name, "late") == pytest.approx(TABLE6_LATE[name], rel=0.03)
    assert SIZES[name].lr == TABLE6_LR[name]
    cfg = size_config(name, ModelConfig(arch="early"))
    assert cfg.n_layers == 24 and cfg.d_model % cfg.n_heads == 0
    assert 32 <= cfg.d_model // cfg.n_heads <= 128 and (cfg.d_model // cfg.n_heads) % 8 == 0


def test_the_counting_convention_decides_only_the_embeddings():
    cfg = size_config("paper-275m", ModelConfig(vocab_size=V))
    plain, paper = count_params(cfg), count_params(cfg, with_embeddings=True)
    assert paper.N - plain.N == plain.N_embedding == 2 * V * 800
    assert paper.N_total == plain.N_total


def test_widths_and_depths_and_the_laptop_ladder():
    assert (
        size_config("w1024d24") == size_config("w1024d24", ModelConfig())
        and size_config("w1024d24").n_layers == 24
    )
    assert heads(1024) == 16 and ffn_hidden(1024) == 2816  # 8d/3 up to a multiple of 256
    assert heads(64) == 4 and ffn_hidden(64) == 168  # the ladder: head dim 16, nearest 8
    for name in LADDER:  # the ladder keeps its shape (the default study's ids depend on it)
        s = size(name)
        assert s.shape == s.late and s.shape.depth == 4 and s.lr is None
    for bad in ("huge", "w1000d24", "w1024d0", "w1024"):
        with pytest.raises(ValueError, match="w1024d24|multiple of 16"):
            size(bad)
