"""Inputs an entry point needs, checked before any work.

A missing input is a :class:`MissingInput` naming the file and the stage and command that make
it (not a traceback from inside a library); an input made from other data than the files
beside it (a codebook from older shards, shards from another tokenizer) is a
:class:`StaleInput` saying what to rerun. Stages record what they were made from
(:func:`digest` of their inputs) so that the next stage can check it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

# the DAG's stages and the command that runs each (dvc.yaml)
MAKES = {
    "corpus": "python -m stages.corpus",
    "tokenizer": "python -m stages.tokenizer",
    "shards": "python -m stages.shards",
    "codebook": "python -m stages.codebook",
    "grid": "python -m flows.grid run",
    "fit": "python -m stages.fit",
}


class InputError(Exception):
    """What the user gave is wrong (a params file, a missing or stale input): the message says
    what and how to fix it, and an entry point prints it instead of a traceback."""


class Placeholder(InputError):
    """A study file's value still reads ``<...>``: the study says where the user's data goes,
    and the value has not been set."""


def require_set(key: str, value: str | None) -> None:
    """Raise :class:`Placeholder` if ``value`` (params key ``key``) is a ``<...>`` placeholder."""
    if isinstance(value, str) and value.strip().startswith("<") and value.strip().endswith(">"):
        raise Placeholder(
            f"{key} is the placeholder {value!r}: set it in the params file to your own "
            "(a path, URL or glob) before running this stage"
        )


class MissingInput(InputError, FileNotFoundError):
    """An input file is missing; the message names it and what makes it."""


class StaleInput(InputError, RuntimeError):
    """An input was made from other data than what lies beside it."""


def how_to_make(stage: str) -> str:
    return f"`dvc repro {stage}` ({MAKES[stage]})"


def require(path: str | Path, stage: str | None, what: str | None = None) -> Path:
    """``path``, which stage ``stage`` makes (None: the user gives it); :class:`MissingInput` if
    it does not exist. A URL (``s3://...``) is looked up in its storage and returned as it is."""
    if "://" in str(path):
        import fsspec

        fs, inner = fsspec.core.url_to_fs(str(path))
        if not fs.exists(inner):
            made = f": it is made by the stage {stage!r}, {how_to_make(stage)}" if stage else ""
            raise MissingInput(f"{what or 'input'} {path} not found{made}")
        return path  # type: ignore[return-value]
    path = Path(path)
    if not path.exists():
        made = f": it is made by the stage {stage!r}, {how_to_make(stage)}" if stage else ""
        raise MissingInput(f"{what or 'input'} {path} not found{made}")
    return path


def digest(path: str | Path) -> str:
    """sha256 of a file (or of an object at a URL), what a stage records of an input it was
    made from."""
    if "://" in str(path):
        import fsspec

        with fsspec.open(str(path), "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def require_made_from(recorded: str | None, current: Path, made: Path, stage: str) -> None:
    """:class:`StaleInput` when ``made`` (an output of ``stage``) recorded that it was made from
    another version of ``current`` than the one there now (``recorded``: its sha256; None: an
    output that did not record it, which is not checked)."""
    if recorded is not None and recorded != digest(current):
        raise StaleInput(
            f"{made} was made from another {str(current).rsplit('/', 1)[-1]} than {current}: "
            f"remake it with "
            f"{how_to_make(stage)}"
        )


def bounded(paths: list, k: int | None, seed: int) -> list:
    """At most ``k`` of ``paths``: all of them (in order) when there are no more, else a seeded
    sample kept in their order. What a stage trains on stays bounded whatever the corpus size,
    and the same params give the same sample."""
    if k is None or len(paths) <= k:
        return list(paths)
    import numpy as np

    keep = np.random.default_rng([seed, len(paths)]).choice(len(paths), size=k, replace=False)
    return [paths[i] for i in sorted(keep)]
