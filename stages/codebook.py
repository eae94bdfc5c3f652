"""Stage ``codebook``: the discrete visual tokenizer, k-means codes over training image patches.

Reads ``data/shards`` (train split, image kinds) and params ``codebook``; writes
``data/codebook/codebook.pt`` (:meth:`model.discrete.VisualCodebook.save`) and
``data/codebook/report.json`` (MSE against random codes, perplexity, iterations, the sha256
of the shards' manifest it was made from, which the grid checks, and on the synthetic world the
information the codes lose: stages/data/codebook.py look_information). The method,
its memory bound and its determinism are described in stages/data/codebook.py.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

from stages.common.inputs import digest, require
from stages.common.stage import entry_point, fresh_dir, parser
from stages.data.codebook import CodebookError, build_codebook, look_information
from stages.params import load_params

log = logging.getLogger(__name__)


def information(codebook, params, image_size: int) -> dict:
    """What the codes keep of the synthetic world's images (look_information), or why not."""
    w = params.corpus.synthetic
    if params.corpus.source != "synthetic":
        return {"skipped": "real data: no known looks to measure against"}
    if image_size != w.image_size:
        return {"skipped": f"the shards' images are {image_size} px, the world's {w.image_size} px"}
    return look_information(codebook, w, params.seed)


@entry_point
def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__, shards="data/shards", out="data/codebook")
    args = ap.parse_args(argv)
    params = load_params(args.params)
    manifest = require(Path(args.shards) / "manifest.parquet", "shards", "the shards' manifest")
    t0 = time.perf_counter()
    try:
        codebook, report = build_codebook(Path(args.shards), params.codebook)
    except CodebookError as e:
        log.error("%s", e)
        return 1
    report["shards_manifest_sha256"] = digest(manifest)  # what it was made from
    report["information"] = information(codebook, params, report["image_size"])
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
        time.perf_counter() - t0,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
