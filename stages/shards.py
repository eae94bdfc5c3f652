"""Stage ``shards``: tokenize every corpus sample into webdataset train/val shards, one task
per corpus or input file (local processes or a Ray cluster: ``data.engine``); real data is read
once, where it lies, each sample checked and each bad one counted on the way.

Reads ``data/corpus`` and ``data/tokenizer/tokenizer.json``; writes
``data/shards/{train,val}/{kind}-FFFFFF-KKKK.tar`` (or to ``shards.url``), ``manifest.parquet``,
``info.json`` and ``report.json`` (samples read, kept and skipped by reason; stages/data/shards.py,
layout in stages/data/shard_format.py). Too many bad samples of a kind (``corpus.files.
max_bad_fraction``) fail the stage before its manifest is written, the report kept.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from stages.common.inputs import require, require_set
from stages.common.stage import entry_point, parser
from stages.data.ingest import IngestError
from stages.data.shards import build_shards
from stages.params import load_params

log = logging.getLogger(__name__)


@entry_point
def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__, corpus="data/corpus", tokenizer="data/tokenizer/tokenizer.json",
                out="data/shards")  # fmt: skip
    ap.add_argument(
        "--workers",
        type=int,
        default=None,
        help="local processes (default: one per CPU; data.engine: ray ignores it)",
    )
    args = ap.parse_args(argv)
    params = load_params(args.params)
    require(Path(args.corpus) / "report.json", "corpus", "the corpus")
    require(args.tokenizer, "tokenizer", "the tokenizer")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one thread per worker process
    require_set("shards.url", params.shards.url)
    try:
        rows = build_shards(Path(args.corpus), Path(args.tokenizer), Path(args.out), params.shards,
                            args.workers, params.data.engine, params.data.address)  # fmt: skip
    except IngestError as e:
        log.error("%s (see %s/report.json)", e, args.out)
        return 1
    log.info("wrote %d shards, %d samples", len(rows), sum(r["samples"] for r in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
