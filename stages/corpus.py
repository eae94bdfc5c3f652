"""Stage ``corpus``: the three data kinds of the paper, generated or ingested, into data/corpus.

``corpus.source: synthetic`` (default) writes the seeded synthetic world of stages/data/synthetic.py;
``corpus.source: files`` checks and copies real data (stages/data/ingest.py). Either way the output
is the canonical corpus of stages/data/corpus_format.py plus ``report.json``: per kind, how many
samples were read and kept, every skipped sample counted by reason, and the summed entropy
floor of the text (synthetic only).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from stages.common.stage import entry_point, parser
from stages.data.corpus import build_corpus
from stages.data.ingest import IngestError
from stages.params import load_params

log = logging.getLogger(__name__)


@entry_point
def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__, out="data/corpus")
    ap.add_argument("--workers", type=int, default=None, help="processes (default: one per CPU)")
    args = ap.parse_args(argv)
    params = load_params(args.params)
    try:
        report = build_corpus(params, Path(args.out), args.workers)
    except IngestError as e:
        log.error("%s (see %s/report.json)", e, args.out)
        return 1
    for kind, r in report["kinds"].items():
        log.info("%s: kept %d of %d, bad %s", kind, r["kept"], r["read"], r["bad"] or "none")
    return 0


if __name__ == "__main__":
    sys.exit(main())
