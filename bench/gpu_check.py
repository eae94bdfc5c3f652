"""GPU check of the paths CI cannot run: bf16 autocast, torch.compile, grouped_mm MoE on CUDA.

Needs a CUDA device. Builds the tests' tiny data (tests/conftest.py TINY_PARAMS) and a codebook
in a temp dir, then prints, side by side in one run:

1. whether ``torch._grouped_mm`` runs forward and backward correctly on CUDA (bf16, fp32);
2. per arch, the loss of the same initial model on the same validation batch: fp32 on CPU vs
   bf16 autocast on CUDA (relative difference);
3. the MoE layer on CUDA bf16: grouped_mm vs padded-bmm output difference and fwd+bwd time;
4. ``flows.training.point.train_point`` on CUDA (eager and torch.compile) and on CPU for the same point:
   status, final losses, tokens/s and MFU;
5. training throughput of a wider model (bf16, eager vs compile, compiled SDPA vs compiled
   FlexAttention): tokens/s and MFU;
6. one point over 1 and N processes (``train.processes``: torchrun, DDP over NCCL, one GPU per
   rank; needs N >= 2 GPUs): status, final losses and their relative difference, tokens/s;
7. the plan's memory estimate (flows/memory.py, bf16) against ``torch.cuda.max_memory_allocated``
   of a training step, activation checkpointing off and on (width 512, depth 8, 4 x 1024 tokens);
8. the paper's sizes as the paper study trains them: early fusion at paper-275m and paper-932m,
   early-moe at paper-275m (the same active size), with FSDP2 (``fully_shard`` per block and root
   over a one-rank process group: the wrapping, bf16 parameters and fp32 reductions of a multi-GPU
   run), bf16 autocast, torch.compile, activation checkpointing and 2 micro-batches per step
   (``flows.training.step.train_step``): tokens/s, MFU, the allocator's peak against the plan's
   estimate; then whether paper-1b6 trains on one GPU with checkpointing. Targets: dense >= 40% MFU
   at paper-932m, MoE >= 0.8x dense tokens/s. (The tests' tiny tokenizer and 32 px images: the
   vocabulary and image tokens are smaller than the paper's, the transformer is the paper's.)

    python bench/gpu_check.py [--out gpu_check.json]
    python bench/gpu_check.py --torchrun-on-cpu   # section 6 only, gloo on CPU (no GPU needed)
    python bench/gpu_check.py --paper-sizes-on-cpu  # section 8's path on CPU at tiny sizes (gloo)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from itertools import islice
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


from flows.config import Point, RunConfig  # noqa: E402
from flows.devices import PEAK_FLOPS  # noqa: E402
from flows.training.point import train_point  # noqa: E402
from model.config import MoEConfig  # noqa: E402
from model.counting import step_flops  # noqa: E402
from model.discrete import VisualCodebook  # noqa: E402
from model.model import MultimodalLM  # noqa: E402
from model.moe import MoEFFN, grouped_mm_works  # noqa: E402
from stages.data.codebook import build_codebook  # noqa: E402
from stages.data.loader import PackedLoader, val_batches  # noqa: E402
from stages.data.shard_format import load_info  # noqa: E402
from stages.params import study_params  # noqa: E402
from tests.conftest import TINY_PARAMS, build_data  # noqa: E402

ARCHS = ("early", "late", "discrete", "early-moe", "early-moe-aware")
# the recipe of sections 4 and 6: short points, a checkpoint every 20 steps
TRAIN = {"warmup_tokens_ref": 1024, "eval_every_tokens": 8192, "eval_batches": 2,
         "checkpoint_every_steps": 20, "batch_rows_ref": 4, "batch_exponent": 0.0}  # fmt: skip


def timed(fn, reps: int) -> float:
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps


def check_losses(params, shards: Path, cb_path: Path) -> dict:
    """Same init, same batch: fp32 CPU loss vs bf16-autocast CUDA loss."""
    info = load_info(shards)
    cb = VisualCodebook.from_file(cb_path)
    batch = next(iter(val_batches(shards, "caption", 8, params.data.context_length)))
    out = {}
    for arch in ARCHS:
        cfg = RunConfig.build(params, Point(arch, "s", 4096, "45-45-10", 0), info).model
        torch.manual_seed(0)
        model = MultimodalLM(cfg, cb if cfg.arch == "discrete" else None).eval()
        with torch.no_grad():
            cpu = model(batch).loss.item()
            model = model.cuda()
            with torch.autocast("cuda", torch.bfloat16):
                gpu = model(batch.to(torch.device("cuda"))).loss.item()
        out[arch] = {"cpu_fp32": cpu, "cuda_bf16": gpu, "rel_diff": abs(gpu - cpu) / cpu}
        print(
            f"  {arch:16s} loss fp32 CPU {cpu:.5f}  bf16 CUDA {gpu:.5f}  rel {out[arch]['rel_diff']:.2e}"
        )
    return out


def check_moe_layer() -> dict:
    dev, dt = torch.device("cuda"), torch.bfloat16
    cfg = MoEConfig(n_experts=8, top_k=1)
    torch.manual_seed(0)
    grouped = MoEFFN(512, 1408, cfg, impl="grouped_mm").to(dev)
    bmm = MoEFFN(512, 1408, cfg, impl="bmm").to(dev)
    bmm.load_state_dict(grouped.state_dict())
    x = torch.randn(16 * 1024, 512, device=dev)
    is_image = torch.rand(16 * 1024, device=dev) < 0.5
    res = {}
    with torch.autocast("cuda", dt):
        yg, _ = grouped(x, is_image)
        yb, _ = bmm(x, is_image)
        res["max_abs_diff"] = (yg.float() - yb.float()).abs().max().item()
        res["ref_scale"] = yb.float().abs().mean().item()

        def step(m):
            def f():
                y, aux = m(x, is_image)
                (y.float().square().mean() + aux["aux_loss"]).backward()

            return f

        res["grouped_mm_ms"] = 1e3 * timed(step(grouped), 20)
        res["bmm_ms"] = 1e3 * timed(step(bmm), 20)
    print(f"  grouped_mm vs bmm: max |diff| {res['max_abs_diff']:.3g} (mean |y| {res['ref_scale']:.3g}); "
          f"fwd+bwd {res['grouped_mm_ms']:.2f} ms vs {res['bmm_ms']:.2f} ms")  # fmt: skip
    return res


def check_train_point(raw: dict, shards: Path, cb: Path, work: Path) -> dict:
    out = {}
    for arch in ("early", "early-moe", "late", "discrete"):
        for device, compile_ in (("cpu", False), ("cuda", False), ("cuda", True)):
            if arch in ("late", "discrete") and device == "cuda" and compile_:
                continue
            p = json.loads(json.dumps(raw))
            p["train"] |= {"device": device, "compile": compile_}
            params = study_params(p)
            cfg = RunConfig.build(
                params, Point(arch, "xs", 16384, "45-45-10", 0), load_info(shards)
            )
            t0 = time.perf_counter()
            rec = train_point(cfg, shards=shards, codebook=cb,
                              workdir=work / f"{arch}-{device}-{compile_}")  # fmt: skip
            key = f"{arch}/{device}{'+compile' if compile_ else ''}"
            out[key] = {k: rec.get(k) for k in ("status", "loss_avg", "loss_caption",
                                                "tokens_per_s", "mfu", "device")}  # fmt: skip
            out[key]["wall_s"] = time.perf_counter() - t0
            print(f"  {key:24s} {rec['status']}  loss_avg {rec['loss_avg']:.4f}  "
                  f"{rec['tokens_per_s']:,.0f} tok/s  wall {out[key]['wall_s']:.1f} s")  # fmt: skip
    return out


def throughput(params, shards: Path, cb_path: Path) -> dict:
    """A wider model on CUDA bf16: eager vs compile, tokens/s and MFU from counted FLOPs."""
    info = load_info(shards)
    out = {}
    for arch in ("early", "early-moe"):
        point = Point(arch, "s", 4096, "45-45-10", 0)
        cfg = RunConfig.build(params, point, info).model.with_(
            d_model=1024, n_heads=16, ffn_hidden=2816, n_layers=8, context_length=1024
        )
        loader = PackedLoader(shards, 16, 1024, {"caption": 0.45, "interleaved": 0.45, "text": 0.1})
        batches = [b.to(torch.device("cuda")) for b in islice(iter(loader.next_batch, None), 4)]
        for compile_, attention in ((False, "sdpa"), (True, "sdpa"), (True, "flex")):
            torch.manual_seed(0)
            model = MultimodalLM(cfg).cuda()
            model.set_attention(attention, compiled=compile_)  # flex: FlexAttention block mask
            fwd = torch.compile(model) if compile_ else model
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
            i = [0]

            def step(fwd=fwd, opt=opt, i=i, batches=batches):
                b = batches[i[0] % len(batches)]
                i[0] += 1
                with torch.autocast("cuda", torch.bfloat16):
                    o = fwd(b)
                o.total.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            for _ in range(3):  # warm-up / compile
                step()
            dt = timed(step, 10)
            b = batches[0]
            flops = step_flops(cfg, *b.tokens.shape, int(b.loss_mask.sum()), len(b.images))
            name = torch.cuda.get_device_name()
            peak = next((v for k, v in PEAK_FLOPS.items() if name.startswith(k)), float("nan"))
            key = f"{arch}{'+compile' if compile_ else ''}{'+flex' if attention == 'flex' else ''}"
            out[key] = {"tokens_per_s": b.tokens.numel() / dt, "mfu": flops / dt / peak,
                        "step_ms": 1e3 * dt}  # fmt: skip
            print(f"  {key:18s} d=1024 L=8 ctx=1024 b=16: {out[key]['tokens_per_s']:,.0f} tok/s, "
                  f"MFU {out[key]['mfu']:.1%}, {out[key]['step_ms']:.1f} ms/step")  # fmt: skip
    return out


def check_torchrun(raw: dict, shards: Path, work: Path, device: str, n: int) -> dict:
    """The same point with train.processes 1 and ``n`` (torchrun), each in a fresh process."""
    import os
    import subprocess

    out = {}
    for arch in ("early", "early-moe"):
        point = Point(arch, "xs", 16384, "45-45-10", 0)
        for procs in (1, n):
            p = json.loads(json.dumps(raw))
            p["train"] |= {"device": device, "processes": procs}
            params = study_params(p)
            wdir = work / f"torchrun-{arch}-{procs}"
            wdir.mkdir(parents=True, exist_ok=True)
            cfg = RunConfig.build(params, point, load_info(shards))
            (wdir / "config.json").write_text(cfg.to_json())
            run = [sys.executable]
            if procs > 1:
                run += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"]
            cmd = [*run, "-m", "flows.train", "--config", str(wdir / "config.json"),
                   "--shards", str(shards), "--codebook", str(wdir / "none.pt"),
                   "--workdir", str(wdir)]  # fmt: skip
            env = dict(os.environ, OMP_NUM_THREADS="1")
            if device == "cuda":
                env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(procs))
            t0 = time.perf_counter()
            r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            if r.returncode != 0:
                out[f"{arch}/{procs}"] = {"error": r.stderr[-2000:]}
                print(f"  {arch:10s} {procs} process(es): FAILED\n{r.stderr[-2000:]}")
                continue
            rec = json.loads(r.stdout.strip().splitlines()[-1])
            key = f"{arch}/{procs}"
            out[key] = {k: rec.get(k) for k in ("status", "loss_avg", "tokens_per_s", "mfu",
                                                "processes")} | {"wall_s": wall}  # fmt: skip
            if procs > 1:
                one = out.get(f"{arch}/1", {}).get("loss_avg")
                out[key]["loss_avg_rel_diff"] = abs(rec["loss_avg"] - one) / one if one else None
            print(f"  {arch:10s} {procs} process(es): {rec['status']}  loss_avg "
                  f"{rec['loss_avg']:.5f}  {rec['tokens_per_s']:,.0f} tok/s  wall {wall:.1f} s")  # fmt: skip
    return out


def check_memory(params_raw: dict, shards: Path) -> dict:
    """Section 7: the estimate vs the CUDA allocator's peak of the third step."""
    from flows.measure_memory import step_peak
    from flows.memory import estimate
    from flows.training.run import Run
    from flows.training.step import train_step

    out = {}
    for arch in ("early", "late", "early-moe"):
        for ac in (False, True):
            raw = json.loads(json.dumps(params_raw))
            raw["data"] = {"context_length": 1024}
            raw["train"] = {"batch_rows_ref": 4, "activation_checkpointing": ac, "device": "cuda"}
            params = study_params(raw)
            cfg = RunConfig.build(params, Point(arch, "w512d8", 10**7, "45-45-10", 0),
                                  load_info(shards))  # fmt: skip
            run = Run(cfg, shards, None, {"fingerprint": "gpu-check"})
            for _ in range(2):
                train_step(run, 1e-4)
            peak = step_peak(run)  # torch.cuda.max_memory_allocated of the third step
            est = estimate(cfg).total
            key = f"{arch} checkpointing {'on' if ac else 'off'}"
            out[key] = {"measured_mib": peak / 2**20, "estimate_mib": est / 2**20,
                        "ratio": est / peak}  # fmt: skip
            print(f"  {key}: measured {peak / 2**20:.0f} MiB, estimate {est / 2**20:.0f} MiB, "
                  f"ratio {est / peak:.2f}")  # fmt: skip
            del run
            torch.cuda.empty_cache()
    return out


PAPER_POINTS = (("early", "paper-275m"), ("early-moe", "paper-275m"), ("early", "paper-932m"))


def one_rank_group(device: str) -> None:
    """A process group of this process alone (FSDP2 shards over one): NCCL on CUDA, gloo on CPU."""
    import os

    import torch.distributed as tdist

    from flows.ui import free_port

    if not tdist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        tdist.init_process_group("nccl" if device == "cuda" else "gloo", rank=0, world_size=1)


def paper_sizes(
    shards: Path,
    device: str = "cuda",
    points: tuple[tuple[str, str], ...] = PAPER_POINTS,
    fits: str | None = "paper-1b6",
    rows: int = 8,
    context: int = 1024,
    steps: int = 10,
) -> dict:
    """Section 8: each point's model as a grid point builds it (flows.training.run.Run), sharded
    with FSDP2 as under torchrun, trained ``steps`` timed steps (after 3 of warm-up and compile)
    of ``rows`` x ``context`` tokens in 2 micro-batches; tokens/s, MFU, peak memory against the
    plan's estimate. ``fits``: a size trained 3 steps only to see that it fits (or not)."""
    from torch.distributed.tensor import DTensor

    from flows.memory import estimate
    from flows.training import dist
    from flows.training.run import Run, build_optimizer
    from flows.training.step import train_step

    one_rank_group(device)
    cuda = device == "cuda"
    info = load_info(shards)
    raw = json.loads(json.dumps(TINY_PARAMS))
    raw["data"] = {"context_length": context}
    raw["train"] = {"batch_rows_ref": rows, "batch_exponent": 0.0, "micro_batch_rows": rows // 2,
                    "activation_checkpointing": True, "compile": True, "sharding": "fsdp",
                    "device": device}  # fmt: skip
    params = study_params(raw)
    mix = {"caption": 0.45, "interleaved": 0.45, "text": 0.1}
    b = PackedLoader(shards, rows, context, mix).next_batch()
    peak_flops = float("nan")
    if cuda:
        name = torch.cuda.get_device_name()
        peak_flops = next((v for k, v in PEAK_FLOPS.items() if name.startswith(k)), peak_flops)
    out: dict = {}
    todo = [(a, s, steps) for a, s in points] + ([("early", fits, 0)] if fits else [])
    for arch, size, n in todo:
        key = f"{arch}/{size}"
        cfg = RunConfig.build(params, Point(arch, size, 10**9, "45-45-10", 0), info)
        run = None
        try:
            run = Run(cfg, shards, None, {"fingerprint": "gpu-check"})
            dist.fully_shard_model(run.model)  # (Run shards only when torchrun gave it 2+ ranks)
            run.opt = build_optimizer(run.model, cfg)  # over the sharded parameters, as Run does
            if cuda and cfg.compile:  # compiled around the sharded model, as Run does
                run.forward = torch.compile(run.model)
            sharded = all(isinstance(p, DTensor) for p in run.model.parameters())
            if cuda and not n:  # only whether it fits: the peak of the 3 steps themselves
                torch.cuda.reset_peak_memory_stats()
            for _ in range(3):
                train_step(run, 1e-4)
            if cuda and n:  # the timed steps' peak (the optimizer state exists by now)
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            for _ in range(n):
                train_step(run, 1e-4)
            if cuda:
                torch.cuda.synchronize()
            dt = (time.perf_counter() - t0) / max(n, 1)
            peak = torch.cuda.max_memory_allocated() if cuda else float("nan")
            est = estimate(cfg).total
            flops = step_flops(cfg.model, rows, context, int(b.loss_mask.sum()), len(b.images))
            r = {"status": "ok", "fsdp2": sharded, "N": cfg.counts.N_total, "peak_gib": peak / 2**30,
                 "estimate_gib": est / 2**30, "estimate_ratio": est / peak}  # fmt: skip
            if n:
                r |= {"tokens_per_s": rows * context / dt, "mfu": flops / dt / peak_flops,
                      "step_ms": 1e3 * dt}  # fmt: skip
            out[key] = r
            speed = (f"{r['tokens_per_s']:,.0f} tok/s, MFU {r['mfu']:.1%}, " if n
                     else "trains (3 steps), ")  # fmt: skip
            print(f"  {key:22s} N {r['N'] / 1e6:,.1f}M, FSDP2 {sharded}: {speed}peak {r['peak_gib']:.1f} GiB, "
                  f"estimate {r['estimate_gib']:.1f} GiB ({r['estimate_ratio']:.2f}x)")  # fmt: skip
        except torch.OutOfMemoryError as e:
            out[key] = {"status": "out of memory", "error": str(e)[:300]}
            print(f"  {key:22s} out of memory")
        finally:
            del run
            if cuda:
                torch.cuda.empty_cache()
    dense, moe = out.get("early/paper-275m", {}), out.get("early-moe/paper-275m", {})
    if "tokens_per_s" in dense and "tokens_per_s" in moe:
        out["moe_over_dense"] = moe["tokens_per_s"] / dense["tokens_per_s"]
        print(f"  MoE / dense tokens/s at paper-275m: {out['moe_over_dense']:.2f}x (target >= 0.8)")
    if "mfu" in out.get("early/paper-932m", {}):
        print(f"  dense MFU at paper-932m: {out['early/paper-932m']['mfu']:.1%} (target >= 40%)")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="write the numbers as JSON here")
    ap.add_argument("--torchrun-on-cpu", action="store_true",
                    help="only section 6, with gloo on CPU (2 processes): checks the script")  # fmt: skip
    ap.add_argument("--paper-sizes-on-cpu", action="store_true",
                    help="only section 8's path, on CPU at tiny sizes (gloo): checks the script")  # fmt: skip
    args = ap.parse_args()
    if args.paper_sizes_on_cpu:
        work = Path(tempfile.mkdtemp())
        data = build_data(work / "data", json.loads(json.dumps(TINY_PARAMS)))
        print("8. FSDP2 (one rank, gloo), checkpointing, 2 micro-batches, on CPU at tiny sizes")
        res = paper_sizes(data.shards, "cpu", (("early", "xs"), ("early-moe", "xs")), "s",
                          rows=4, context=64, steps=2)  # fmt: skip
        if args.out:
            Path(args.out).write_text(json.dumps(res, indent=1))
        return 0
    if args.torchrun_on_cpu:
        work = Path(tempfile.mkdtemp())
        raw = json.loads(json.dumps(TINY_PARAMS))
        data = build_data(work / "data", raw)
        raw["train"] = TRAIN
        print("6. one point over 1 and 2 processes (torchrun, gloo, CPU)")
        res = check_torchrun(raw, data.shards, work, "cpu", 2)
        if args.out:
            Path(args.out).write_text(json.dumps(res, indent=1))
        return 0
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 1
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    res: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    work = Path(tempfile.mkdtemp())
    raw = json.loads(json.dumps(TINY_PARAMS))
    data = build_data(work / "data", raw)
    cb_path = work / "codebook.pt"
    params = study_params(raw)
    cb, _ = build_codebook(
        data.shards, params.codebook.model_copy(update={"samples": 5000, "iters": 10})
    )
    cb.save(cb_path)

    def section(name, fn):
        try:
            res[name] = fn()
        except Exception as e:  # report and go on: one broken path must not hide the others
            import traceback

            traceback.print_exc()
            res[name] = {"error": repr(e)}

    print("1. grouped_mm on CUDA:")
    res["grouped_mm_works"] = {
        str(dt): grouped_mm_works("cuda", dt) for dt in (torch.bfloat16, torch.float32)
    }
    print(f"  {res['grouped_mm_works']}")
    print("2. same model, same batch: fp32 CPU vs bf16 CUDA loss")
    section("losses", lambda: check_losses(params, data.shards, cb_path))
    print("3. MoE layer, CUDA bf16")
    section("moe_layer", check_moe_layer)
    print("4. flows.training.point.train_point")
    raw["train"] = TRAIN
    section("train_point", lambda: check_train_point(raw, data.shards, cb_path, work / "runs"))
    print("5. throughput of a wider model")
    section("throughput", lambda: throughput(params, data.shards, cb_path))
    n = torch.cuda.device_count()
    print(f"6. one point over 1 and {n} processes (torchrun, NCCL)")
    if n >= 2:
        section("torchrun", lambda: check_torchrun(raw, data.shards, work, "cuda", n))
    else:
        print("  needs 2 or more GPUs (NCCL: one GPU per rank); skipped")
        res["torchrun"] = {"skipped": f"{n} GPU"}
    print("7. the memory estimate vs the CUDA allocator's peak (bf16)")
    section("memory", lambda: check_memory(json.loads(json.dumps(TINY_PARAMS)), data.shards))
    print("8. the paper's sizes: FSDP2, bf16, compile, checkpointing, 2 micro-batches")
    section("paper_sizes", lambda: paper_sizes(data.shards))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
