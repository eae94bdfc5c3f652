"""Which code made a result: the git revision of the working tree, and whether it was dirty.

Records (grid points, trunk checkpoints, fits) carry it beside the code fingerprint of
flows/plan.py: the fingerprint decides what is current; the revision says where to look.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from stages.common.paths import ROOT


@dataclass(frozen=True)
class GitRevision:
    commit: str  # HEAD's sha, or "unknown" outside a git checkout
    dirty: bool  # tracked files (under the given paths) differ from HEAD

    def __str__(self) -> str:
        return self.commit + ("+dirty" if self.dirty else "")


def git_revision(root: Path = ROOT, paths: Sequence[str] = ()) -> GitRevision:
    """HEAD of the checkout at ``root``; dirty if tracked files under ``paths`` (every tracked
    file when empty) differ from it. Untracked files do not count."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no", "--", *paths))
    except (OSError, subprocess.CalledProcessError):
        return GitRevision("unknown", False)
    return GitRevision(commit, dirty)
