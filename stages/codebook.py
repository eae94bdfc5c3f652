"""Stage ``codebook``: the discrete visual tokenizer, k-means codes over training image patches.

Reads ``data/shards`` (train split, image kinds) and params ``codebook``; writes
``data/codebook/codebook.pt`` (:meth:`model.discrete.VisualCodebook.save`) and
``data/codebook/report.json`` (MSE against random codes, perplexity, iterations). The method,
its memory bound and its determinism are described in stages/data/codebook.py.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from stages.common.stage import fresh_dir, setup_logging
from stages.data.codebook import CodebookError, build_codebook
from stages.params import load_params

log = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--shards", default="data/shards")
    ap.add_argument("--out", default="data/codebook")
    args = ap.parse_args(argv)
    setup_logging()
    params = load_params(args.params)
    try:
        codebook, report = build_codebook(Path(args.shards), params.codebook)
    except CodebookError as e:
        log.error("%s", e)
        return 1
    out = fresh_dir(args.out)
    codebook.save(out / "codebook.pt")
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    log.info(
        "codebook: K=%d from %d patches, mse %.5f (random codes %.5f), perplexity %.1f, "
        "%d iterations%s, %.1f s",
        report["n_codes"],
        report["samples"],
        report["mse"],
        report["baseline_mse"],
        report["perplexity"],
        report["iterations"],
        " (converged)" if report["converged"] else "",
        report["wall_time_s"],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
