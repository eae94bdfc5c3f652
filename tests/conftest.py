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

# The test files that take longest (seconds on the 2-core machine, roughly slowest first; sorting
# them strictly by these seconds measured no faster). `make test` hands whole files to two
# workers in this order (--dist loadfile --no-loadscope-reorder), so the long ones start first
# and short ones fill the end, instead of a long file starting last.
SLOW_FILES = (  # (seconds of setup + calls in one `make test` of 2026-12-07)
    "tests/flows/training/test_distributed.py",  # ~640: torchrun jobs of 2 ranks
    "tests/stages/reporting/test_report.py",  # ~190: studies fitted and reported
    "tests/scaleout/test_pool.py",  # ~280: a Slurm cluster and a Prefect pool
    "tests/flows/test_ui.py",  # ~235: both servers and a browser
    "tests/scaleout/test_tracking_outage.py",  # ~225: an MLflow server down for 30 s
    "tests/stages/scaling/test_families.py",  # ~185: 80 law choices
    "tests/test_dvc_repro.py",  # ~230: the end-to-end dvc repro
    "tests/flows/test_grid.py",  # ~210
    "tests/scaleout/test_servers.py",  # ~205: PostgreSQL, S3, MLflow and Prefect servers
    "tests/scaleout/test_checkpoints_s3.py",  # ~175
    "tests/flows/test_memory.py",  # ~160
    "tests/scaleout/test_shards_ray.py",  # ~100: two Ray clusters
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The slowest files first (:data:`SLOW_FILES`); the others keep their order."""
    rank = {f: i for i, f in enumerate(SLOW_FILES)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))


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


@pytest.fixture(scope="session")
def uninterrupted() -> dict:
    """Uninterrupted training runs, kept for the session: the tests of one worker that compare
    against the same run train it once (tests/flows/training/test_distributed.py ``reference``)."""
    return {}
