"""``python -m flows.pool {deploy,worker,up}``: set up a Prefect work pool for the grid
(flows/pool/__init__.py explains how the grid uses it)."""

from __future__ import annotations

import argparse
import os
import sys

from flows.pool.deploy import HEARTBEAT_S, ZOMBIE_AFTER_S, deploy, up, worker_command, worker_env


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m flows.pool",
        description="Run grid points on a Prefect work pool (flows/pool/). Needs a Prefect "
        "server: export PREFECT_API_URL=http://HOST:4200/api.",
    )
    sub = ap.add_subparsers(dest="command", required=True)
    d = sub.add_parser("deploy", help="create the pool, the deployment and the zombie automation")
    d.add_argument("--pool", required=True)
    d.add_argument("--workers", type=int, default=2, help="at most this many runs at once")
    d.add_argument("--source", default=None,
                   help="where workers get the code: a git URL, or a path every machine has "
                   "(default: this checkout, %(default)s)")  # fmt: skip
    d.add_argument("--zombie-after", type=float, default=ZOMBIE_AFTER_S,
                   help="seconds without a heartbeat before a run is marked Crashed")  # fmt: skip
    w = sub.add_parser("worker", help="start one worker (runs one chain at a time)")
    w.add_argument("--pool", required=True)
    w.add_argument("--name", default=None, help="(default: host name + GPU)")
    w.add_argument("--gpu", default=None,
                   help="the GPU(s) this worker owns (CUDA_VISIBLE_DEVICES): one, or "
                   "train.processes of them for points over several processes, e.g. 0,1")  # fmt: skip
    w.add_argument("--heartbeat", type=int, default=HEARTBEAT_S, help="seconds (>= 30)")
    u = sub.add_parser("up", help="deploy, then run N workers here until Ctrl-C (make pool)")
    u.add_argument("--pool", default="local")
    u.add_argument("--workers", type=int, default=2)
    args = ap.parse_args(argv)
    if not os.environ.get("PREFECT_API_URL"):
        print("error: set PREFECT_API_URL to the Prefect server's API", file=sys.stderr)
        return 2
    if args.command == "deploy":
        deploy(args.pool, args.workers, args.source, args.zombie_after)
        return 0
    if args.command == "up":
        return up(args.pool, args.workers)
    name = args.name or os.uname().nodename + (f"-gpu{args.gpu}" if args.gpu else "")
    env = worker_env(name, args.gpu, args.heartbeat)
    os.execve(worker_command(args.pool, name)[0], worker_command(args.pool, name), env)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
