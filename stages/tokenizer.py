"""Stage ``tokenizer``: a byte-level BPE (HF ``tokenizers``) trained on the corpus text.

Writes ``data/tokenizer/tokenizer.json``. With ``tokenizer.source: file`` it loads a user's
``tokenizer.json`` instead and adds whichever special tokens it lacks. The special tokens are
the ones the multimodal decoder needs: padding, begin/end of document, and the image
boundary and placeholder tokens (see stages/data/shard_format.py for how they are laid out).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from stages.common.inputs import require, require_set
from stages.common.stage import entry_point, parser
from stages.data.tokenizer import build, special_ids
from stages.params import load_params

log = logging.getLogger(__name__)


@entry_point
def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__, corpus="data/corpus", out="data/tokenizer")
    args = ap.parse_args(argv)
    params = load_params(args.params)
    if params.tokenizer.source == "train":
        require(Path(args.corpus) / "report.json", "corpus", "the corpus")
    else:
        require_set("tokenizer.path", params.tokenizer.path)
        require(params.tokenizer.path, None, "your tokenizer (tokenizer.path)")
    tok = build(params.tokenizer, Path(args.corpus))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    log.info("tokenizer: %d tokens, specials %s", tok.get_vocab_size(), special_ids(tok))
    return 0


if __name__ == "__main__":
    sys.exit(main())
