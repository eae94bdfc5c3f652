"""Stage ``shards``: tokenize every corpus sample into webdataset train/val shards per kind.

Reads ``data/corpus`` and ``data/tokenizer/tokenizer.json``; writes
``data/shards/{train,val}/{kind}-NNNNNN.tar``, ``manifest.parquet`` and ``info.json`` (layout in
stages/data/shard_format.py). Streams: memory does not grow with the corpus. Deterministic: the same
corpus, tokenizer and params give byte-identical shards (fixed tar mtime, stable key-hash split).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from stages.common.inputs import require
from stages.common.stage import entry_point, parser
from stages.data.shards import build_shards
from stages.params import load_params

log = logging.getLogger(__name__)


@entry_point
def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__, corpus="data/corpus", tokenizer="data/tokenizer/tokenizer.json",
                out="data/shards")  # fmt: skip
    ap.add_argument("--workers", type=int, default=None, help="processes (default: one per CPU)")
    args = ap.parse_args(argv)
    params = load_params(args.params)
    require(Path(args.corpus) / "report.json", "corpus", "the corpus")
    require(args.tokenizer, "tokenizer", "the tokenizer")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one thread per worker process
    rows = build_shards(
        Path(args.corpus), Path(args.tokenizer), Path(args.out), params.shards, args.workers
    )
    log.info("wrote %d shards, %d samples", len(rows), sum(r["samples"] for r in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
