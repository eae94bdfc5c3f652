"""How long a checkpoint holds training up, per format (flows/training/checkpoints.py), measured
side by side in one run, one process on CPU, on a local disk:

- ``full``: the state gathered and written as one file by rank 0 (``torch.save``);
- ``sharded``: DCP, each rank its shards (here one rank), then the commit;
- ``sharded async``: DCP's shards copied in memory at the save, written in the background;
  "blocked" is the time the step waits, "committed" until the version is whole.

Builds the tests' tiny data in a temp dir and a model of ``--size`` (default w512d8, ~30M
parameters with its AdamW state ~0.4 GB); a few rounds in turn, medians and ratios to ``full``.

    python bench/checkpoint_speed.py [--size w768d12] [--rounds 3] [--store DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flows.config import Point, RunConfig  # noqa: E402
from flows.training.checkpoints import Slot, Store  # noqa: E402
from flows.training.run import Run  # noqa: E402
from flows.training.step import train_step  # noqa: E402
from stages.data.shard_format import load_info  # noqa: E402
from stages.params import study_params  # noqa: E402
from tests.conftest import TINY_PARAMS, build_data  # noqa: E402

FORMATS = {"full": {}, "sharded": {"checkpoint_format": "sharded"},
           "sharded async": {"checkpoint_format": "sharded", "checkpoint_async": True}}  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="w512d8", help="a size name or wWIDTHdDEPTH")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--store", default=None, help="where to write (default: a temp dir)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", "torch.distributed is disabled")  # (one process)
    work = Path(tempfile.mkdtemp())
    raw = json.loads(json.dumps(TINY_PARAMS))
    data = build_data(work / "data", raw)
    params = study_params(raw)
    cfg = RunConfig.build(params, Point("early", args.size, 10**6, "45-45-10", 0),
                          load_info(data.shards))  # fmt: skip
    store = Store(args.store or work / "store")
    runs = {}
    for name, how in FORMATS.items():
        run = Run(cfg.with_(**how), data.shards, None, {"fingerprint": "bench"})
        train_step(run, 1e-4)  # (the optimizer's moments exist)
        runs[name] = run
    print(f"early {args.size}: N {cfg.counts.N:,}, one process, CPU, {store}")
    times: dict[str, dict[str, list[float]]] = {n: {"blocked": [], "committed": [], "load": []}
                                                for n in FORMATS}  # fmt: skip
    for r in range(args.rounds):
        for name, run in runs.items():
            slot = Slot(store / name.replace(" ", "-"), "latest")
            run.c.step = r + 1
            t0 = time.perf_counter()
            run.save(slot)
            t1 = time.perf_counter()
            run.settle()
            t2 = time.perf_counter()
            run.load(slot.resumable())
            t3 = time.perf_counter()
            times[name]["blocked"].append(t1 - t0)
            times[name]["committed"].append(t2 - t0)
            times[name]["load"].append(t3 - t2)
    ref = {k: statistics.median(v) for k, v in times["full"].items()}
    print(f"{'format':<15}{'blocked s':>11}{'committed s':>13}{'load s':>9}"
          f"{'blocked / full':>16}{'load / full':>13}")  # fmt: skip
    for name, t in times.items():
        m = {k: statistics.median(v) for k, v in t.items()}
        print(f"{name:<15}{m['blocked']:>11.3f}{m['committed']:>13.3f}{m['load']:>9.3f}"
              f"{m['blocked'] / ref['blocked']:>16.2f}{m['load'] / ref['load']:>13.2f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
