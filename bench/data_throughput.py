"""Data-path throughput on real JPEGs at 224 px: check -> tokenize -> shard, 1 vs 2 workers,
bytes per sample in shards (encoded vs raw), the loader from S3 against what a 275M model's
training step consumes, and the core-hours 1B captions would take.

    python bench/data_throughput.py [--captions 2000] [--files 8]

The captions are crops of the photographs scikit-learn and matplotlib ship (random boxes of
256-640 px, flipped at random, JPEG quality 90, as img2dataset tars), so every image is decoded,
checked, centre-cropped, resized to 224 px and re-encoded as the paper study stores it (JPEG
quality 95). Each number is measured in this run, side by side (the machine is noisy); the
loader reads from moto's S3 server on loopback (no network: a lower bound on storage latency).
What a training step consumes is planned, not measured: the paper study's rows per step over
its GPU-seconds per step at plan.mfu of plan.gpu_peak_tflops (flows/memory.py).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stages.data.corpus_format import write_json  # noqa: E402
from stages.data.ingest import check_corpus, list_inputs  # noqa: E402
from stages.data.shards import build_shards  # noqa: E402
from stages.data.tokenizer import corpus_texts, train_bpe  # noqa: E402
from stages.params import load_params, study_params  # noqa: E402

_TEXT = ("a photo of the old temple by the lake with red roof and green trees under a blue sky "
         "portrait of a woman in uniform flower petals close up garden morning light")  # fmt: skip
WORDS = _TEXT.split()


def photos() -> list[np.ndarray]:
    import matplotlib
    import sklearn

    paths = [Path(sklearn.__file__).parent / "datasets" / "images" / n
             for n in ("china.jpg", "flower.jpg")]  # fmt: skip
    paths.append(Path(matplotlib.__file__).parent / "mpl-data" / "sample_data" / "grace_hopper.jpg")
    return [np.asarray(Image.open(p).convert("RGB")) for p in paths]


def make_captions(root: Path, n: int, files: int, seed: int = 0) -> list[str]:
    """``n`` caption samples in ``files`` img2dataset tars (key.jpg, key.txt, key.json)."""
    rng = np.random.default_rng(seed)
    srcs = photos()
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for f in range(files):
        path = root / f"{f:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(f * n // files, (f + 1) * n // files):
                src = srcs[i % len(srcs)]
                h, w = src.shape[:2]
                bh, bw = (int(rng.integers(256, min(640, s) + 1)) for s in (h, w))
                y, x = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
                crop = src[y : y + bh, x : x + bw]
                if rng.random() < 0.5:
                    crop = crop[:, ::-1]
                buf = io.BytesIO()
                Image.fromarray(np.ascontiguousarray(crop)).save(buf, format="JPEG", quality=90)
                text = " ".join(rng.choice(WORDS, size=int(rng.integers(8, 24))))
                meta = json.dumps({"key": f"{i:09d}", "width": bw, "height": bh})
                for ext, data in (("jpg", buf.getvalue()), ("txt", text.encode()),
                                  ("json", meta.encode())):  # fmt: skip
                    info = tarfile.TarInfo(f"{i:09d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(str(path))
    return paths


def timed(fn, *args, **kw) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn(*args, **kw)
    return time.perf_counter() - t0, out


def loader_rate(shards, rows: int, context: int, workers: int, seconds: float = 8.0) -> float:
    """Packed rows per second the loader yields (caption rows only), over ``seconds``."""
    from stages.data.loader import PackedLoader

    loader = PackedLoader(shards, rows, context, {"caption": 1.0, "interleaved": 0.0,
                                                  "text": 0.0}, workers=workers)  # fmt: skip
    try:
        loader.next_batch()  # (the first shard's read and the workers' start)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            loader.next_batch()
            n += rows
        return n / (time.perf_counter() - t0)
    finally:
        loader.close()


def consumed_rows_per_gpu_s() -> tuple[float, int, int]:
    """(rows per GPU-second, rows per step, context) of the paper study's 275M early-fusion point."""
    from flows.config import Point, RunConfig
    from flows.memory import gpu_hours

    params = load_params(ROOT / "studies" / "paper.yaml")
    point = Point("early", "paper-275m", params.grid.tokens[0], next(iter(params.grid.mixtures)), 0)
    cfg = RunConfig.build(params, point, None)
    step_gpu_s = gpu_hours(cfg, params, steps=1) * 3600
    return cfg.schedule.batch_rows / step_gpu_s, cfg.schedule.batch_rows, cfg.context_length


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--captions", type=int, default=2000)
    ap.add_argument("--files", type=int, default=8, help="input tars (tasks of the shards stage)")
    args = ap.parse_args()
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    tmp = Path(tempfile.mkdtemp(prefix="nmm-data-bench-"))
    print(f"{args.captions} captions of real JPEGs in {args.files} tars ({os.cpu_count()} CPUs); "
          f"work in {tmp}")  # fmt: skip
    inputs = make_captions(tmp / "input", args.captions, args.files)
    src_bytes = sum(Path(p).stat().st_size for p in inputs) / args.captions
    base = {"corpus": {"source": "files", "files": {"caption": inputs}},
            "shards": {"image_size": 224, "patch_size": 14, "samples_per_shard": 1000,
                       "images": "encoded", "encode": "jpeg", "quality": 95},
            "data": {"context_length": 1024}}  # fmt: skip
    p = study_params(base)
    corpus = tmp / "corpus"
    t_list, listing = timed(list_inputs, p.corpus.files)
    write_json(corpus / "report.json", listing)  # the corpus stage's output: no copy
    t_check2, _ = timed(check_corpus, corpus, 2)  # the optional dry run (stages.corpus --check)
    t_check, _ = timed(check_corpus, corpus, 1)
    tok = train_bpe(corpus_texts(corpus), vocab_size=1024, min_frequency=2)
    tok_path = tmp / "tokenizer.json"
    tok.save(str(tok_path))
    rates, sizes = {}, {}
    for name, workers, shards in (("jpeg, 1 worker", 1, p.shards), ("jpeg, 2 workers", 2, p.shards),
                                  ("raw, 2 workers", 2,
                                   p.shards.model_copy(update={"images": "raw"}))):  # fmt: skip
        out = tmp / name.replace(", ", "-").replace(" ", "")
        t, rows = timed(build_shards, corpus, tok_path, out, shards, workers)
        rates[name] = args.captions / t
        sizes[name] = sum((out / r["path"]).stat().st_size for r in rows) / args.captions
    per_core_1 = rates["jpeg, 1 worker"]
    check_rate = args.captions / t_check
    print(
        "\nper sample (real JPEG -> 224 px; the shards stage checks, tokenizes and shards in one "
        f"pass; the corpus stage listed the {args.files} inputs in {t_list * 1e3:.0f} ms):"
    )
    check2 = args.captions / t_check2
    print(f"  check only (corpus --check), 1 worker   {check_rate:8.1f} samples/s")
    print(f"  check only (corpus --check), 2 workers  {check2:8.1f} samples/s ({check2 / 2:.1f} "
          f"per core; {check2 / check_rate:.2f}x)")  # fmt: skip
    for name, r in rates.items():
        w = 2 if "2" in name else 1
        print(f"  shards stage, {name:16s}         {r:8.1f} samples/s ({r / w:.1f} per core)")
    print(f"  scaling 1 -> 2 workers:                 {rates['jpeg, 2 workers'] / per_core_1:.2f}x")
    print("\nbytes per sample:")
    print(f"  source JPEGs (q90, 256-640 px):      {src_bytes:8.0f}")
    print(f"  shards, encoded (JPEG q95, 224 px):  {sizes['jpeg, 2 workers']:8.0f}")
    print(f"  shards, raw pixels (.npy):           {sizes['raw, 2 workers']:8.0f} "
          f"({sizes['raw, 2 workers'] / sizes['jpeg, 2 workers']:.1f}x encoded)")  # fmt: skip
    print(f"\n1B captions, shards stage: {1e9 / per_core_1 / 3600:,.0f} core-hours "
          f"({per_core_1:.1f} samples/s per core at 1 worker: each input read once, where it "
          "lies, checked, tokenized and sharded; a task per input file, over cores and Ray "
          f"nodes); a check-only dry run first adds {1e9 / check_rate / 3600:,.0f}")  # fmt: skip

    # the loader from S3 (moto on loopback)
    from moto.server import ThreadedMotoServer

    from flows.ui import free_port

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # (moto's request log)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                       "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"})  # fmt: skip
    try:
        import boto3

        boto3.client("s3").create_bucket(Bucket="bench")
        url_shards = p.shards.model_copy(update={"url": "s3://bench/shards"})
        build_shards(corpus, tok_path, tmp / "s3-manifest", url_shards, 2)
        need, rows, context = consumed_rows_per_gpu_s()
        print(f"\nloader from S3, whole batches (rows of {context} tokens; the 275M model trains "
              f"{rows} rows a step, ~{need:.1f} rows per GPU-second at the plan's MFU; a rank "
              "decodes only its own rows' images):")  # fmt: skip
        for workers in (0, 2):
            r = loader_rate(tmp / "s3-manifest", 16, context, workers)
            print(
                f"  {workers} reader processes: {r:8.1f} rows/s = {r / need:.2f}x what one GPU "
                "consumes"
            )
    finally:
        server.stop()


if __name__ == "__main__":
    main()
