"""Train one grid point in this process: ``python -m flows.train --point JSON``.

The grid flow (flows/grid.py) runs this for every point, one process each (on Linux forked from
a server that has imported this module already: flows/supervise.py). The training itself (recipe, run, loop, cooldown
branching, record) is in flows/training/.

Example: ``python -m flows.train --point '{"arch": "early", "size": "xxs", "tokens": 100000,
"mixture": "45-45-10", "seed": 0}'`` trains one point and prints its record.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import psutil

from flows.plan import Point, for_point
from flows.training.dist import teardown
from flows.training.point import PlanMismatch, train_point
from stages.common.stage import setup_logging
from stages.params import ParamsError, load_params


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m flows.train",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n")[-1],
    )
    ap.add_argument(
        "--point", required=True, help="JSON: arch, size, tokens, mixture, seed[, experts]"
    )
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--shards", default="data/shards")
    ap.add_argument("--codebook", default="data/codebook/codebook.pt")
    ap.add_argument("--workdir", default="results")
    ap.add_argument("--point-id", default=None, help="the id the grid planned (checked first)")
    args = ap.parse_args(argv)
    startup = time.time() - psutil.Process().create_time()  # interpreter + imports
    setup_logging()
    try:
        point = Point.from_dict(json.loads(args.point))
        params = for_point(point, load_params(args.params))
        codebook = Path(args.codebook) if Path(args.codebook).exists() else None
        rec = train_point(
            point,
            params,
            shards=Path(args.shards),
            codebook=codebook,
            workdir=Path(args.workdir),
            expect_id=args.point_id,
            startup_s=startup,
        )
    except (ParamsError, PlanMismatch) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        teardown()  # torchrun: leave the point's process group
    print(json.dumps(rec, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
