"""Shared fixtures: a tiny synthetic corpus, tokenizer and shards built once per session."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

from stages.data.corpus import build_corpus
from stages.data.shards import build_shards
from stages.data.tokenizer import build as build_tokenizer
from stages.params import REPO_PARAMS, Params, merge, read_yaml, study_params

# One thread per test process, as training runs: tiny matmuls are slower with two threads.
torch.set_num_threads(1)

TINY_PARAMS = {
    "corpus": {
        "samples_per_file": 100,
        "synthetic": {"n_caption": 300, "n_interleaved": 100, "n_text": 150},
    },
    "tokenizer": {"vocab_size": 1024},  # the BPE stops when every word is whole (~490)
    "shards": {"samples_per_shard": 60, "val_fraction": 0.2},
    "data": {"context_length": 64},
}


def write_study(path: Path, *overrides: dict) -> Path:
    """A complete params.yaml at ``path``: the repository's with ``overrides`` merged in."""
    raw = read_yaml(REPO_PARAMS)
    for o in overrides:
        raw = merge(raw, o)
    path.write_text(yaml.safe_dump(raw))
    return path


@dataclass
class DataDirs:
    params: Params
    corpus: Path
    tokenizer: Path
    shards: Path


def build_data(root: Path, raw: dict = TINY_PARAMS, workers: int = 1) -> DataDirs:
    params = study_params(raw)  # the repository's params.yaml with the tiny overrides
    d = DataDirs(params, root / "corpus", root / "tokenizer" / "tokenizer.json", root / "shards")
    build_corpus(params, d.corpus, workers=workers)
    d.tokenizer.parent.mkdir(parents=True, exist_ok=True)
    build_tokenizer(params.tokenizer, d.corpus).save(str(d.tokenizer))
    build_shards(d.corpus, d.tokenizer, d.shards, params.shards, workers=workers)
    return d


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> DataDirs:
    return build_data(tmp_path_factory.mktemp("tiny"))
