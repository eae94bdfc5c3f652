"""Shared fixtures: a tiny synthetic corpus, tokenizer and shards built once per session."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from stages.corpus import build_corpus
from stages.params import Params, validate_params
from stages.shards import build_shards
from stages.tokenizer import build as build_tokenizer

# One thread per test process, as training runs: tiny matmuls are slower with two (STACK-NOTES).
torch.set_num_threads(1)

TINY_PARAMS = {
    "corpus": {
        "samples_per_file": 100,
        "synthetic": {"n_caption": 300, "n_interleaved": 100, "n_text": 150},
    },
    "tokenizer": {"vocab_size": 400},
    "shards": {"samples_per_shard": 60, "val_fraction": 0.2},
    "data": {"context_length": 64},
}


@dataclass
class DataDirs:
    params: Params
    corpus: Path
    tokenizer: Path
    shards: Path


def build_data(root: Path, raw: dict = TINY_PARAMS, workers: int = 1) -> DataDirs:
    params = validate_params(raw)
    d = DataDirs(params, root / "corpus", root / "tokenizer" / "tokenizer.json", root / "shards")
    build_corpus(params, d.corpus, workers=workers)
    d.tokenizer.parent.mkdir(parents=True, exist_ok=True)
    build_tokenizer(params.tokenizer, d.corpus).save(str(d.tokenizer))
    build_shards(d.corpus, d.tokenizer, d.shards, params.shards, workers=workers)
    return d


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> DataDirs:
    return build_data(tmp_path_factory.mktemp("tiny"))
