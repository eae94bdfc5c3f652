"""Do the CPU kernels change a point's numbers here, and does the grid's pin (flows/devices.py)
make this machine's numbers another's?

Trains one early and one early-moe point on the tests' tiny data (built in a temp dir), each in
its own ``python -m flows.train`` process, under each environment below, and prints the final
losses to the last digit:

- ``pinned``: the grid's AVX2 pins (``flows.devices.CPU_KERNELS``), what every grid point runs;
- ``native``: none of them set: the code paths this CPU picks for itself;
- ``aten default`` and ``mkl compatible``: ATen's unvectorised kernels, MKL's most portable path
  (they show that the kernels alone move a loss).

On one machine, ``native`` equals ``pinned`` where the pins are what runs anyway. The check the
pins exist for needs two machines: run this on both (e.g. one with AVX-512, one without) and
compare their ``pinned`` rows; they should agree to the last digit.

    python bench/cpu_kernels.py [--size xxs] [--tokens 40000]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flows.config import Point, RunConfig  # noqa: E402
from flows.devices import CPU_KERNELS, _cpu_capability  # noqa: E402
from stages.data.shard_format import load_info  # noqa: E402
from stages.params import study_params  # noqa: E402
from tests.conftest import TINY_PARAMS, build_data  # noqa: E402

ENVS = {
    "pinned": CPU_KERNELS,
    "native": {},
    "aten default": {"ATEN_CPU_CAPABILITY": "default"},
    "mkl compatible": {"MKL_CBWR": "COMPATIBLE"},
}
FIELDS = ("loss_avg", "train_loss")


def train(cfg: RunConfig, shards: Path, work: Path, env: dict[str, str]) -> dict:
    """One point in a fresh process with ``env`` for the kernel variables; its record."""
    work.mkdir(parents=True)
    (work / "config.json").write_text(cfg.to_json())
    clean = {k: v for k, v in os.environ.items() if k not in CPU_KERNELS}
    clean |= {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", **env}
    cmd = [sys.executable, "-m", "flows.train", "--config", str(work / "config.json"),
           "--shards", str(shards), "--workdir", str(work)]  # fmt: skip
    r = subprocess.run(cmd, cwd=ROOT, env=clean, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    (record,) = [json.loads(p.read_text()) for p in (work / "points").glob("*/record.json")]
    return record


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="xxs", help="a size name or wWIDTHdDEPTH")
    ap.add_argument("--tokens", type=int, default=40000, help="each point's token budget")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp())
    raw = json.loads(json.dumps(TINY_PARAMS))
    data = build_data(work / "data", raw)
    params = study_params(raw)
    print(f"ATen's widest kernels here: {_cpu_capability()}; points of {args.tokens:,} tokens")
    print(f"{'arch':<11}{'kernels':<16}{'record cpu_kernels':<54}"
          + "".join(f"{f:>22}" for f in FIELDS) + "  = pinned")  # fmt: skip
    for arch in ("early", "early-moe"):
        point = Point(arch, args.size, args.tokens, "45-45-10", 0)
        cfg = RunConfig.build(params, point, load_info(data.shards))
        got = {n: train(cfg, data.shards, work / arch / n.replace(" ", "-"), env)
               for n, env in ENVS.items()}  # fmt: skip
        for name, rec in got.items():
            same = all(rec[f] == got["pinned"][f] for f in FIELDS)
            print(f"{arch:<11}{name:<16}{rec['cpu_kernels']:<54}"
                  + "".join(f"{rec[f]:>22.17g}" for f in FIELDS) + f"  {'yes' if same else 'no'}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
