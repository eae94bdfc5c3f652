"""The repository's Slurm scripts on a real one-node Slurm cluster (tests/scaleout/conftest.py
``slurm``): a point's ranks launched by ``srun`` as two tasks (flows/slurm/point.sh: a torchrun
agent per task, c10d rendezvous at the allocation's first node) train the model of one process.
The pool workers started by ``sbatch`` (flows/slurm/pool-workers.sbatch), one cancelled
mid-chain, are tests/scaleout/test_pool.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from flows.config import Point
from flows.ui import free_port
from stages.common.paths import ROOT
from tests.flows.training.test_distributed import ENV, reference, same_as_one_process
from tests.flows.training.test_point import config, tiny_params

pytestmark = [pytest.mark.scaleout, pytest.mark.slow]


def slurm_env(slurm, **extra: str) -> dict[str, str]:
    """What a job needs: the cluster's config, this venv's python first on PATH."""
    path = f"{Path(sys.executable).parent}:{os.environ['PATH']}"
    return dict(ENV, PATH=path, **slurm.env, **extra)


def test_a_two_task_srun_point_trains_the_model_of_one_process(
    slurm, tiny_data, tmp_path, uninterrupted
):
    params = tiny_params(tiny_data)
    point = Point("early", "xxs", 4096, "45-45-10", 0)
    one, curve1 = reference(uninterrupted, tiny_data, point, tmp_path / "one", 1)
    work = tmp_path / "srun"
    work.mkdir()
    cfg = work / "config.json"
    cfg.write_text(config(tiny_data, params, point).with_(processes=2, sharding="fsdp").to_json())
    out = subprocess.run(
        ["srun", "--ntasks=2", f"--chdir={ROOT}", str(ROOT / "flows/slurm/point.sh"),
         "--config", str(cfg), "--shards", str(tiny_data.shards),
         "--codebook", str(work / "none.pt"), "--workdir", str(work)],
        env=slurm_env(slurm, NMM_RDZV_PORT=str(free_port())), capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    same_as_one_process(work, one, curve1)
