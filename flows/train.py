"""Train one grid point in this process: ``python -m flows.train --config CONFIG.json``.

The grid (flows/grid/) runs this for every point, one process each (on Linux forked from a
server that has imported this module already: flows/supervise.py), with the point's run config
(flows/config.py) written beside its record; this process reads that config and nothing else of
the study (never params.yaml). The training itself is in flows/training/.

Example: ``python -m flows.grid plan --configs --params params.yaml > plan.jsonl`` prints every
point's run config; one line of it, saved as ``point.json``, trains with ``python -m flows.train
--config point.json`` and prints the point's record.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import psutil

from flows.config import RunConfig
from flows.training.dist import teardown
from flows.training.point import PlanMismatch, train_point
from stages.common.inputs import InputError
from stages.common.paths import resolve
from stages.common.stage import setup_logging


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m flows.train",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n")[-1],
    )
    ap.add_argument("--config", required=True, help="the point's run config (a JSON file)")
    ap.add_argument("--shards", default="data/shards")
    ap.add_argument("--codebook", default="data/codebook/codebook.pt")
    ap.add_argument("--workdir", default="results")
    ap.add_argument("--point-id", default=None, help="the id the grid planned (checked first)")
    args = ap.parse_args(argv)
    startup = time.time() - psutil.Process().create_time()  # interpreter + imports
    setup_logging()
    try:
        cfg = RunConfig.from_json(Path(args.config).read_text())
    except (OSError, ValueError) as e:
        print(f"error: --config {args.config}: {e}", file=sys.stderr)
        return 2
    try:
        codebook = Path(args.codebook) if Path(args.codebook).exists() else None
        rec = train_point(
            cfg,
            shards=resolve(args.shards),
            codebook=codebook,
            workdir=Path(args.workdir),
            expect_id=args.point_id,
            startup_s=startup,
        )
    except (PlanMismatch, InputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        teardown()  # torchrun: leave the point's process group
    print(json.dumps({k: v for k, v in rec.items() if k != "config"}, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
