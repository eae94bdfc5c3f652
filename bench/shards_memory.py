"""Peak memory and speed of the ``shards`` stage at 1x and 10x the default corpus.

The stage streams, so its peak RSS must not grow with the corpus. Each scale gets its own
corpus and tokenizer (built by the stage CLIs in bench/out/shards-{scale}x/); then the shards
stage runs in a fresh process whose peak RSS (all its worker processes included: the largest
one) is read from getrusage.

    python bench/shards_memory.py [--scales 1 10] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import yaml

ROOT = Path(__file__).resolve().parents[1]
PEAK = (
    "import resource, subprocess, sys;"
    "r = subprocess.run(sys.argv[1:]);"
    "print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
)


def run_measured(cmd: list[str], cwd: Path) -> tuple[float, float]:
    """(wall seconds, peak RSS in MiB of the largest process) of one command."""
    t0 = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", PEAK, *cmd], cwd=cwd, capture_output=True, text=True, check=True
    ).stdout.split()
    rc, kib = int(out[-2]), int(out[-1])
    if rc != 0:
        raise SystemExit(f"{cmd} failed with {rc}")
    return time.perf_counter() - t0, kib / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scales", type=int, nargs="+", default=[1, 10])
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    rows = []
    for scale in args.scales:
        out = ROOT / "bench" / "out" / f"shards-{scale}x"
        out.mkdir(parents=True, exist_ok=True)
        params = json.loads(json.dumps(base))
        for k in ("n_caption", "n_interleaved", "n_text"):
            params["corpus"]["synthetic"][k] *= scale
        (out / "params.yaml").write_text(yaml.safe_dump(params))
        py = [sys.executable, "-m"]
        if not (out / "data/tokenizer/tokenizer.json").exists():
            gen_s, _ = run_measured([*py, "stages.corpus", "--workers", str(args.workers)], out)
            print(f"{scale}x: corpus generated in {gen_s:.0f} s", flush=True)
            run_measured([*py, "stages.tokenizer"], out)
        wall, peak = run_measured([*py, "stages.shards", "--workers", str(args.workers)], out)
        manifest = out / "data/shards/manifest.parquet"

        n = sum(pq.read_table(manifest).column("samples").to_pylist())
        rows.append((scale, n, wall, n / wall, peak))
        print(
            f"{scale}x: {n} samples, {wall:.1f} s, {n / wall:,.0f} samples/s, "
            f"peak RSS {peak:.0f} MiB",
            flush=True,
        )
    print("\nscale  samples     wall s   samples/s   peak RSS MiB")
    for scale, n, wall, sps, peak in rows:
        print(f"{scale:>4}x  {n:>8}  {wall:>9.1f}  {sps:>10,.0f}  {peak:>13.0f}")
    if len(rows) > 1:
        print(f"peak RSS ratio {rows[-1][0]}x/{rows[0][0]}x: {rows[-1][4] / rows[0][4]:.2f}")


if __name__ == "__main__":
    main()
