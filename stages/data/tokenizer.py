"""The tokenizer (stage ``tokenizer``, entry point stages/tokenizer.py): a byte-level BPE (HF
``tokenizers``) trained on the corpus text, or a user's ``tokenizer.json``.

With ``tokenizer.source: file`` a user's tokenizer is loaded and given whichever special tokens
it lacks. The special tokens are the ones the multimodal decoder needs: padding, begin/end of
document, and the image boundary and placeholder tokens (see stages/data/shard_format.py for
how they are laid out).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from stages.common.inputs import bounded
from stages.data.ingest import corpus_parts, part_docs
from stages.data.kinds import KINDS
from stages.params import TokenizerParams

log = logging.getLogger(__name__)

# name -> token string; trained tokenizers give them ids 0..5 in this order.
SPECIAL_TOKENS = {
    "pad": "<|pad|>",
    "bos": "<|bos|>",
    "eos": "<|eos|>",
    "image": "<|image|>",  # one per image patch position
    "boi": "<|begin_of_image|>",
    "eoi": "<|end_of_image|>",
}


def corpus_texts(corpus: Path, max_files: int | None = None, seed: int = 0) -> Iterator[str]:
    """Every text of the corpus, or of a seeded sample of ``max_files`` files per kind (corpus
    files, or a real corpus's input files, read where they lie)."""
    for kind in KINDS:
        for part in bounded(corpus_parts(corpus, kind), max_files, seed):
            for doc in part_docs(part):
                yield from (t for t in doc.texts if t)


def train_bpe(texts: Iterator[str], vocab_size: int, min_frequency: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    # a space before every text: a word is the same token at the start of a text as inside it
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    # ... which decoding removes again: decode(encode(text)) == text
    tok.decoder = decoders.Sequence([decoders.ByteLevel(), decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def with_special_tokens(tok: Tokenizer) -> Tokenizer:
    """Add the special tokens a user's tokenizer lacks (they get new ids at the end)."""
    missing = [s for s in SPECIAL_TOKENS.values() if tok.token_to_id(s) is None]
    if missing:
        log.warning("adding special tokens missing from the tokenizer: %s", missing)
        tok.add_special_tokens(missing)
    return tok


def special_ids(tok: Tokenizer) -> dict[str, int]:
    ids = {name: tok.token_to_id(s) for name, s in SPECIAL_TOKENS.items()}
    missing = [n for n, i in ids.items() if i is None]
    if missing:
        raise ValueError(f"tokenizer lacks special tokens {missing}; rerun the tokenizer stage")
    return ids


def build(params: TokenizerParams, corpus: Path) -> Tokenizer:
    if params.source == "file":
        path = Path(params.path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer.path: {path} does not exist")
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:  # the library raises a bare Exception on bad JSON
            raise ValueError(f"tokenizer.path: {path} is not a valid tokenizer.json: {e}") from e
        return with_special_tokens(tok)
    texts = corpus_texts(corpus, params.max_files, params.seed)
    return train_bpe(texts, params.vocab_size, params.min_frequency)
