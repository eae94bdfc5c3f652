"""flows/memory.py and the plan's costs: the memory estimate against the allocator's measured
peak of real training steps on CPU, activation checkpointing (the same numbers, less memory),
a point too big for the stated memory refused before any work, GPU-hours with shared trunks,
and ``train.device: cuda`` without a usable GPU refused with the reason."""

from __future__ import annotations

import json

import pytest
import torch

from flows.config import Point, RunConfig
from flows.devices import choose_device, cuda_unavailable
from flows.grid.__main__ import main
from flows.launch import torchrun
from flows.measure_memory import step_peak
from flows.memory import block_bytes_per_token, estimate, gpu_hours, trained_steps
from flows.plan import expand_grid, fingerprints, plan
from flows.training.run import Run
from flows.training.step import train_step
from model.config import ModelConfig, MoEConfig
from model.decoder import Block, rope_cache
from model.model import MultimodalLM
from stages.data.loader import PackedLoader
from stages.data.shard_format import load_info
from stages.params import ParamsError, load_params, study_params
from tests.flows.conftest import write_params

MIX = {"caption": 0.45, "interleaved": 0.45, "text": 0.10}


def _params(tiny_data, **train):
    data = json.loads(tiny_data.params.model_dump_json())
    return study_params(
        {k: data[k] for k in ("corpus", "tokenizer", "shards")},
        {"data": {"context_length": 256}, "train": {"batch_rows_ref": 8, "warmup_tokens_ref": 64,
                                                    **train}},
    )  # fmt: skip


def _saved_bytes(block: torch.nn.Module, tokens: int, d: int, heads: int) -> float:
    """Bytes of the activations ``block`` saves for backward (not its parameters), per token."""
    B, L = 2, tokens // 2
    x = torch.randn(B, L, d, requires_grad=True)
    mask = torch.zeros(B, 1, L, L)
    rope = rope_cache(torch.arange(L).expand(B, L), d // heads, 10000.0)
    skip = {t.untyped_storage().data_ptr() for t in [*block.parameters(), mask, rope]}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            seen.setdefault(ptr, t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(x, rope, mask)
    return sum(seen.values()) / tokens


@pytest.mark.parametrize("moe", [None, MoEConfig(n_experts=8, top_k=1)])
def test_the_count_of_saved_activations_is_what_a_block_saves(moe):
    d, h, heads = 128, 344, 8
    got = _saved_bytes(Block(d, heads, h, 1e-5, moe), 256, d, heads)
    want = block_bytes_per_token(d, h, heads, False, moe.n_experts if moe else 0, 1)
    assert got == pytest.approx(want, rel=0.01)


@pytest.mark.parametrize("arch", ["early", "late", "early-moe"])
def test_the_memory_estimate_is_within_15_percent_of_the_measured_peak(tiny_data, arch):
    """One process on CPU (fp32), 8 rows of 256 tokens, width 128, depth 4: the estimate and
    the allocator's peak of the third step (the first two create the optimizer's state), with
    activation checkpointing off and on."""
    measured = {}
    for ac in (False, True):
        params = _params(tiny_data, activation_checkpointing=ac)
        cfg = RunConfig.build(params, Point(arch, "w128d4", 10**6, "45-45-10", 0),
                              load_info(tiny_data.shards))  # fmt: skip
        run = Run(cfg, tiny_data.shards, None, {"fingerprint": "test"})
        for _ in range(2):
            train_step(run, 1e-3)
        measured[ac] = step_peak(run)  # one process: the profiler's exact count
        est = estimate(cfg, precision="fp32").total
        assert 0.85 <= est / measured[ac] <= 1.15, (arch, ac, est / 2**20, measured[ac] / 2**20)
    assert measured[True] < 0.6 * measured[False]  # checkpointing saves memory


def _batch(tiny_data, rows=4, ctx=128):
    return PackedLoader(tiny_data.shards, rows, ctx, MIX, seed=3).next_batch()


@pytest.mark.parametrize("arch", ["early", "late", "early-moe"])
def test_activation_checkpointing_gives_identical_losses_and_gradients(tiny_data, arch):
    info = load_info(tiny_data.shards)
    params = _params(tiny_data)
    cfg = RunConfig.build(params, Point(arch, "xs", 10**5, "45-45-10", 0), info).model
    batch = _batch(tiny_data)
    results = []
    for ac in (False, True):
        torch.manual_seed(0)
        model = MultimodalLM(cfg)
        model.set_activation_checkpointing(ac)
        out = model(batch)
        out.total.backward()
        results.append((out.loss.detach(), out.aux_loss.detach(),
                        {n: p.grad for n, p in model.named_parameters()}))  # fmt: skip
    (l0, a0, g0), (l1, a1, g1) = results
    assert torch.equal(l0, l1) and torch.equal(a0, a1)
    assert g0.keys() == g1.keys()
    for name in g0:
        assert (g0[name] is None) == (g1[name] is None), name
        if g0[name] is not None:
            assert torch.equal(g0[name], g1[name]), name


def test_checkpointing_is_a_setting_of_how_not_of_what(tiny_data):
    """Training with it on or off is the same point (the same id and numbers)."""
    info = load_info(tiny_data.shards)
    off = RunConfig.build(_params(tiny_data), Point("early", "xxs", 8192, "45-45-10", 0), info)
    on = RunConfig.build(_params(tiny_data, activation_checkpointing=True), off.point, info)
    assert on.activation_checkpointing and on.identity() == off.identity()
    runs = [Run(c, tiny_data.shards, None, {"fingerprint": "t"}) for c in (off, on)]
    for _ in range(3):
        losses = [float(train_step(r, 1e-3).loss) for r in runs]
        assert losses[0] == losses[1]


def test_a_point_too_big_for_the_stated_memory_is_refused_before_any_work(tiny_data, tmp_path,
                                                                           capsys):  # fmt: skip
    """With plan.gpu_memory_gib between the estimates with and without checkpointing, ``run``
    stops before Prefect starts, naming the sizes and what would make them fit; the suggested
    change passes."""
    sections = {"grid": {"archs": ["early"], "sizes": ["s"], "tokens": [4096]},
                "data": {"context_length": 256}, "train": {"batch_rows_ref": 8}}  # fmt: skip
    path = write_params(tmp_path / "params.yaml", **sections)
    params = load_params(path)
    (job,) = plan(params, fingerprints(tiny_data.shards, None))
    off = estimate(job.config, params.plan.image_share).gib
    on = estimate(job.config.with_(activation_checkpointing=True), params.plan.image_share).gib
    sections["plan"] = {"gpu_memory_gib": (off + on) / 2}
    path = write_params(tmp_path / "params.yaml", **sections)
    results = tmp_path / "results"
    args = ["--params", str(path), "--shards", str(tiny_data.shards),
            "--codebook", str(tmp_path / "none.pt"), "--results", str(results)]  # fmt: skip
    assert main(["run", *args]) == 2
    err = capsys.readouterr().err
    assert "cannot fit plan.gpu_memory_gib" in err and "early s:" in err
    assert "train.activation_checkpointing: true" in err and "micro_batch_rows" in err
    assert not results.exists()  # nothing started, nothing written
    assert main(["plan", *args]) == 2  # the dry run says so too, after its table
    assert "cannot fit" in capsys.readouterr().err
    sections["train"]["activation_checkpointing"] = True
    path = write_params(tmp_path / "params.yaml", **sections)
    assert main(["plan", *args]) == 0


def test_sharding_divides_the_state_and_checkpointing_the_activations():
    params = study_params({"train": {"batch_rows_ref": 64}, "data": {"context_length": 1024}})
    cfg = RunConfig.build(params, Point("early", "w1024d24", 10**9, "45-45-10", 0), None)
    one = estimate(cfg)
    fsdp = estimate(cfg.with_(processes=8, sharding="fsdp", micro_batch_rows=8))
    ddp = estimate(cfg.with_(processes=8, micro_batch_rows=8))
    assert fsdp.weights == pytest.approx(one.weights / 8) and fsdp.optimizer < one.optimizer
    assert ddp.weights == one.weights and ddp.buffers > one.buffers  # DDP's gradient buckets
    ac = estimate(cfg.with_(activation_checkpointing=True))
    assert ac.activations < one.activations / 5
    assert estimate(cfg.with_(micro_batch_rows=8)).activations < one.activations / 4


def test_gpu_hours_count_shared_trunks_once():
    params = study_params({"grid": {"archs": ["early"], "sizes": ["xxs", "xs"]}})
    configs = [RunConfig.build(params, p, None) for p in expand_grid(params)]
    steps = trained_steps(configs)
    for size in ("xxs", "xs"):
        group = [(c, s) for c, s in zip(configs, steps, strict=True) if c.point.size == size]
        scheds = [c.schedule for c, _ in group]
        # the trunk once, to the last budget's cooldown start, then every cooldown
        want = max(s.cooldown_start for s in scheds) + sum(
            s.steps - s.cooldown_start for s in scheds
        )
        assert sum(s for _, s in group) == want < sum(s.steps for s in scheds)
    c = configs[0]
    pl = params.plan
    from flows.memory import step_model_flops

    assert gpu_hours(c, params) == pytest.approx(
        c.schedule.steps * step_model_flops(c) / (pl.gpu_peak_tflops * 1e12 * pl.mfu) / 3600
    )


def test_device_cuda_without_a_usable_gpu_stops_with_the_reason(tiny_data, tmp_path, capsys,
                                                               caplog):  # fmt: skip
    why = cuda_unavailable()
    with caplog.at_level("INFO", logger="flows.devices"):
        got = choose_device("auto")
    assert f"train.device auto: {got}" in caplog.text and torch.__version__ in caplog.text
    if why is None:  # a machine with a GPU: cuda is what it gets
        assert choose_device("cuda").type == "cuda"
        return
    if torch.version.cuda is None:
        assert "CPU build" in why
    with pytest.raises(ParamsError, match="train.device is 'cuda' but"):
        choose_device("cuda")
    assert choose_device("auto").type == "cpu"
    path = write_params(tmp_path / "params.yaml", train={"device": "cuda"})
    args = ["run", "--params", str(path), "--shards", str(tiny_data.shards),
            "--codebook", str(tmp_path / "none.pt"), "--results", str(tmp_path / "r")]  # fmt: skip
    assert main(args) == 2
    assert why in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_model_config_defaults_stay_what_the_estimate_assumes():
    """The estimate's per-token count assumes SwiGLU, QK-norm and a fused attention kernel:
    a block of the default config saves no L x L attention scores."""
    cfg = ModelConfig()
    block = Block(cfg.d_model, cfg.n_heads, cfg.ffn_hidden, cfg.norm_eps, None)
    short = _saved_bytes(block, 64, cfg.d_model, cfg.n_heads)
    long = _saved_bytes(block, 512, cfg.d_model, cfg.n_heads)
    assert long == pytest.approx(short, rel=0.01)  # per token: no term that grows with L


@pytest.mark.slow
@pytest.mark.scaleout
@pytest.mark.parametrize("arch", ["early", "early-moe"])
def test_the_fsdp_estimate_is_within_15_percent_of_each_ranks_peak(tiny_data, tmp_path, arch):
    """FSDP2 over 2 processes (gloo), width 128, depth 4: each rank's measured peak (python -m
    flows.measure_memory: glibc's heap sampled during the step, every thread) against the
    estimate, with activation checkpointing off and on, and with 1 row per pass (the sharded
    state and FSDP's gathered blocks then weigh most; there the estimate may read 25% low on
    one rank: docs/plan.md)."""
    import os
    import subprocess

    from stages.common.paths import ROOT

    info = load_info(tiny_data.shards)
    for i, train in enumerate([{"activation_checkpointing": False},
                               {"activation_checkpointing": True},
                               {"activation_checkpointing": True, "micro_batch_rows": 1}]):  # fmt: skip
        params = _params(tiny_data, processes=2, sharding="fsdp", **train)
        cfg = RunConfig.build(params, Point(arch, "w128d4", 10**6, "45-45-10", 0), info)
        path = tmp_path / f"config-{i}.json"
        path.write_text(cfg.to_json())
        cmd = [*torchrun(2), "-m", "flows.measure_memory", "--config", str(path),
               "--shards", str(tiny_data.shards)]  # fmt: skip
        out = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"),
                             capture_output=True, text=True, timeout=300)  # fmt: skip
        assert out.returncode == 0, out.stderr[-3000:]
        got = json.loads(out.stdout.strip().splitlines()[-1])
        assert got["processes"] == 2 and len(got["measured_gib"]) == 2
        assert got["estimate_gib"] == pytest.approx(estimate(cfg, precision="fp32").gib)
        # one row per pass: on an Intel Xeon rank 0 alone held ~3 MiB (of 15) more than rank 1
        # and than on the AMD machines, run after run (0.77-0.82; cause not found): 0.75 there
        low = 0.75 if train.get("micro_batch_rows") == 1 else 0.85
        for ratio in got["estimate_over_measured"]:
            assert low <= ratio <= 1.15, json.dumps([arch, train, got])
