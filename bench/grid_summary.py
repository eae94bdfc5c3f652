"""Where a grid's time went, and how much of the machine it used.

    python bench/grid_summary.py [--runs results/runs.parquet] [--params params.yaml]
                                 [--tracking-uri URI]

Reads the points' records (results/runs.parquet) and the grid's last launch run in MLflow
(experiment ``nmm-<grid.study>``: its wall time, workers and the grid process's own costs),
measures the one-thread fp32 256x256 matmul ceiling of this machine now (the same kind of
matmul the models are made of), and prints:

- the breakdown of the workers' time over the points trained by that launch: process start-up
  (interpreter and imports), build (model, optimizer, loader), data, training steps,
  evaluation, checkpoints, other, the grid's MLflow calls, and the rest of the launch's
  worker-seconds (scheduling, the grid's own work, idle slots at the end);
- the **utilization**: the model FLOPs those points did (trunks once: with cooldown branching)
  ÷ (launch wall × workers × the ceiling measured here). Only CPU grids (the ceiling is a CPU
  thread's);
- the FLOPs saved by cooldown branching, and FLOP/s inside the training steps.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PHASES = ("startup", "build", "data", "steps", "eval", "checkpoint", "other")


def matmul_ceiling(n: int = 256, seconds: float = 2.0) -> float:
    """Best fp32 FLOP/s of an n x n matmul on one thread, over ``seconds``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(20):
        a @ b
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        for _ in range(50):
            a @ b
        best = max(best, 50 * 2 * n**3 / (time.perf_counter() - t0))
    torch.set_num_threads(threads)
    return best


def branched_flops(ok: pd.DataFrame) -> tuple[float, float]:
    """(FLOPs done with cooldown branching: each group's trunk once, FLOPs if every point
    trained alone). A point's ``flops`` count its trunk; per-step FLOPs of a group are equal."""
    alone = float(ok.flops.sum())
    done = 0.0
    for _, g in ok.groupby("group_id"):
        per_step = (g.flops / g.steps).mean()
        done += per_step * (g.branch_step.max() + (g.steps - g.branch_step).sum())
    return done, alone


def last_launch(study: str, uri: str | None) -> tuple[dict, set[str]] | None:
    """The metrics of the last finished launch run of the study in MLflow that trained points
    (a rerun that skipped every point measures nothing), and the point ids of the point runs
    it trained (tag ``nmm.launch``)."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from flows.tracking import LAUNCH_TAG, Tracker

    tracker = Tracker(study, uri)
    runs = tracker.client.search_runs(
        [tracker.experiment_id],
        "tags.`nmm.kind` = 'launch' and metrics.`launch/wall_s` > 0 "
        "and metrics.`launch/trained` > 0",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not runs:
        return None
    run_id = runs[0].info.run_id
    points = tracker.client.search_runs(
        [tracker.experiment_id], f"tags.`{LAUNCH_TAG}` = '{run_id}'", max_results=50000
    )
    m = {k.removeprefix("launch/"): v for k, v in runs[0].data.metrics.items()}
    return {"run_id": run_id, **m}, {r.data.tags.get("point_id") for r in points}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", default="results/runs.parquet")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--tracking-uri", default=None, help="default: the grid's (flows/tracking.py)")
    ap.add_argument("--also-ceiling", type=float, default=None, metavar="GFLOPS",
                    help="also print the utilization against this ceiling (another machine's, "
                         "e.g. 38 for the one the throughput issue measured)")  # fmt: skip
    args = ap.parse_args(argv)

    from stages.params import load_params

    params = load_params(args.params)
    runs = pd.read_parquet(args.runs)
    ok = runs[runs.status == "ok"]
    print(f"{len(runs)} points in {args.runs}, {len(ok)} ok")
    found = last_launch(params.grid.study, args.tracking_uri)
    if found is None:
        print("no finished launch run in MLflow: nothing to measure")
        return 1
    launch, ids = found
    trained = int(launch.get("trained", 0))
    print(f"last launch {launch['run_id']}: {trained} points trained on "
          f"{int(launch.get('workers', 0))} workers in {launch['wall_s']:.1f} s")  # fmt: skip
    if trained == 0 or "workers" not in launch or "time_process_s" not in ok:
        print("it trained nothing, or predates the timings: nothing to measure")
        return 1
    mine = ok[ok.point_id.isin(ids) & ok.time_process_s.notna()]
    if len(mine) != trained:
        print(f"warning: {len(mine)} ok records with timings for {trained} trained points")

    ceiling = matmul_ceiling()
    wall, workers = launch["wall_s"], launch["workers"]
    capacity = wall * workers
    done, alone = branched_flops(mine)
    print(f"\none-thread fp32 256x256 matmul ceiling, measured now: {ceiling / 1e9:.1f} GFLOP/s")
    print(f"model FLOPs done: {done:.3e} ({1 - done / alone:.0%} less than every point alone, "
          f"{alone:.3e})")  # fmt: skip
    util = done / (capacity * ceiling)
    print(f"UTILIZATION: {util:.1%} = FLOPs done / ({wall:.0f} s wall x {workers:.0f} workers x "
          f"ceiling)")  # fmt: skip
    if args.also_ceiling:
        other = done / (capacity * args.also_ceiling * 1e9)
        print(f"  against a {args.also_ceiling:g} GFLOP/s ceiling: {other:.1%}")
    steps = mine.time_steps_s.sum()
    print(f"inside training steps: {done / steps / 1e9:.1f} GFLOP/s per worker "
          f"({done / steps / ceiling:.0%} of the ceiling)\n")  # fmt: skip

    print(f"where the {capacity:.0f} worker-seconds (wall x workers) went:")
    total = lambda col: float(mine[col].fillna(0).sum()) if col in mine else 0.0  # noqa: E731
    rows = [(f"point: {p}", total(f"time_{p}_s")) for p in PHASES]
    in_process = total("time_process_s")
    # spawn, interpreter, imports and exit: the process's life minus what it accounted for
    rows[0] = ("point: start-up and exit", in_process - sum(v for _, v in rows[1:]))
    rows.append(("grid: MLflow run start", total("time_mlflow_start_s")))
    rows.append(("grid: record + MLflow end", float(launch.get("finish_s", 0.0))))
    rows.append(("grid: scheduling, idle slots", capacity - sum(v for _, v in rows)))
    for name, v in rows:
        print(f"  {name:<30} {v:8.1f} s  {v / capacity:6.1%}")
    print(f"concurrently, the grid streamed curves to MLflow for {total('time_mlflow_stream_s'):.0f} "
          f"s and its process used {launch.get('cpu_s', float('nan')):.0f} CPU-seconds "
          "(Prefect's ephemeral server not counted)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
