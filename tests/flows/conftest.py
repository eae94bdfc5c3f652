"""Fixtures of the flow tests: a Prefect test server (real, ephemeral, once per session), one
MLflow SQLite store per module, and the tiny grid params (tiny_params.yaml over TINY_PARAMS)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from stages.params import REPO_PARAMS, merge, read_yaml
from tests.conftest import TINY_PARAMS

TINY_GRID = yaml.safe_load((Path(__file__).parent / "tiny_params.yaml").read_text())


def grid_params(**sections: dict) -> dict:
    """The repository's params.yaml + TINY_PARAMS + the tiny grid, with per-test overrides by
    section: a complete params mapping."""
    return merge(merge(merge(read_yaml(REPO_PARAMS), TINY_PARAMS), TINY_GRID), sections)


def write_params(path: Path, **sections: dict) -> Path:
    path.write_text(yaml.safe_dump(grid_params(**sections)))
    return path


@pytest.fixture(scope="session")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
