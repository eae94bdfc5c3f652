"""Stage ``corpus``: the three data kinds of the paper, generated or listed, into data/corpus.

``corpus.source: synthetic`` (default) writes the seeded synthetic world of stages/data/synthetic.py
as the canonical corpus of stages/data/corpus_format.py, and ``report.json`` says per kind how
many samples were written and the summed entropy floor of their text. ``corpus.source: files``
lists real data where it lies, copying nothing: ``report.json`` names each input file with its
size and version tag; the shards stage reads each once, checking and counting every sample
(stages/data/ingest.py). ``--check`` then reads the corpus through those checks and counts the
bad samples by reason without sharding (a dry run of the data: one read of every input).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from stages.common.stage import entry_point, parser
from stages.data.corpus import build_corpus
from stages.data.ingest import IngestError, check_corpus
from stages.params import load_params

log = logging.getLogger(__name__)


@entry_point
def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__, out="data/corpus")
    ap.add_argument("--workers", type=int, default=None, help="processes (default: one per CPU)")
    ap.add_argument(
        "--check",
        action="store_true",
        help="after writing the corpus, read every sample through the checks and count the bad "
        "ones by reason (nothing else written; data.engine runs the reads); exit 1 when a kind "
        "has more than corpus.files.max_bad_fraction",
    )
    args = ap.parse_args(argv)
    params = load_params(args.params)
    try:
        report = build_corpus(params, Path(args.out), args.workers)
    except IngestError as e:  # a pattern that matches nothing, an unknown format, a store's refusal
        log.error("%s", e)
        return 1
    for kind, r in report["kinds"].items():
        if report["source"] == "files":
            log.info("%s: %d input files, %.1f MB", kind, len(r["inputs"]), r["bytes"] / 1e6)
        else:
            log.info("%s: %d samples", kind, r["kept"])
    if args.check:
        try:
            check_corpus(Path(args.out), args.workers, params.data.engine, params.data.address)
        except IngestError as e:
            log.error("%s", e)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
