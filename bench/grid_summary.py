"""Summarise a finished grid: compute used, achieved FLOP/s vs the 1-thread ceiling, and the
saving from cooldown branching (trunk once + a cooldown per budget vs every budget from 0).

    python bench/grid_summary.py [results/runs.parquet]
"""

from __future__ import annotations

import sys
from pathlib import Path

import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flows.devices import PEAK_FLOPS  # noqa: E402

CEILING = PEAK_FLOPS["cpu-thread"]  # fp32 256x256 matmul, one thread (flows/devices.py)


def main() -> None:
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "results/runs.parquet")
    rows = pq.read_table(path).to_pylist()
    ok = [r for r in rows if r["status"] == "ok"]
    print(f"{len(rows)} points, {len(ok)} ok, {len(rows) - len(ok)} failed")
    flops = sum(r["flops"] for r in ok)
    train_s = sum(r["train_s"] for r in ok)
    print(f"model FLOPs of the points (as if each trained alone): {flops:.3e}")
    print(f"C (paper convention, 6ND / 6(NvDv+ND)) summed: {sum(r['C'] for r in ok):.3e}")
    groups: dict[str, list[dict]] = {}
    for r in ok:
        groups.setdefault(r["group_id"], []).append(r)
    separate = branched = 0
    for pts in groups.values():
        separate += sum(r["flops"] for r in pts)
        per_step = {r["steps"]: r["flops"] / r["steps"] for r in pts}
        trunk = max(r["branch_step"] for r in pts)
        top = max(pts, key=lambda r: r["branch_step"])
        branched += trunk * per_step[top["steps"]]
        branched += sum((r["steps"] - r["branch_step"]) * per_step[r["steps"]] for r in pts)
    print(
        f"with cooldown branching: {branched:.3e} FLOPs, {1 - branched / separate:.0%} "
        f"less than training every budget from scratch ({separate:.3e})"
    )
    print(
        f"achieved: {flops / train_s / 1e9:.1f} GFLOP/s per point process "
        f"({flops / train_s / CEILING:.0%} of the {CEILING / 1e9:.0f} GFLOP/s 1-thread matmul "
        f"ceiling; mean MFU of the points {sum(r['mfu'] for r in ok) / len(ok):.0%})"
    )
    for arch in sorted({r["arch"] for r in ok}):
        best = sorted(
            (r["N"], r["tokens_budget"], round(r["loss_avg"], 3)) for r in ok if r["arch"] == arch
        )
        print(f"  {arch:<16} " + "  ".join(f"N={n:,}/D={d:,}:{loss}" for n, d, loss in best))


if __name__ == "__main__":
    main()
