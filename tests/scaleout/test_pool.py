"""Points over many machines (flows/pool/): a Prefect server on PostgreSQL, a process work pool
and two workers, each a job of the test Slurm cluster started by the repository's sbatch script
(flows/slurm/pool-workers.sbatch), train a 6-point grid; one worker's job is cancelled
(``scancel``, as a preemption or a time limit would) in the middle of a point. The point's
chain is marked Crashed, submitted again, resumed from its checkpoints by the other worker, and
every point ends once, with one MLflow run each, with the numbers of an uninterrupted run. Then
a second grid, with no worker to run its chains, is cancelled: so are its chains."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from mlflow import MlflowClient

from flows import records
from flows.ui import Servers, free_port
from stages.common.paths import ROOT
from tests.flows.conftest import write_params
from tests.flows.test_ui import _json
from tests.scaleout.test_slurm import slurm_env

GRID = {"archs": ["early"], "sizes": ["xxs", "xs"], "tokens": [4096, 8192, 16384],
        "study": "pool", "retries": 1}  # fmt: skip
LOSSES = ("loss_avg", "loss_caption", "loss_interleaved", "loss_text", "train_loss", "steps")


def _grid(params: Path, results: Path, uri: str, env: dict, tiny_data) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "flows.grid", "run", "--params", str(params),
         "--shards", str(tiny_data.shards), "--codebook", str(results / "none.pt"),
         "--results", str(results), "--tracking-uri", uri],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def _kill_tree(proc: subprocess.Popen) -> None:
    tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    for p in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.mark.scaleout
@pytest.mark.slow
def test_a_pool_of_two_slurm_workers_trains_each_point_once_and_survives_a_cancelled_one(
    postgres, slurm, tiny_data, tmp_path
):
    postgres.create_db("prefect_pool")
    servers = Servers(
        free_port(), free_port(), postgres.create_db("mlflow_pool"), tmp_path / "artifacts",
        tmp_path / "prefect", tmp_path / "logs", None,
        postgres.url("prefect_pool", "postgresql+asyncpg"),
    )  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    # the reference: the same grid, uninterrupted, in this process's usual local mode
    ref_params = write_params(tmp_path / "ref.yaml", grid=GRID)
    ref = _grid(ref_params, tmp_path / "ref", f"sqlite:///{tmp_path}/ref.db",
                env | {"PREFECT_HOME": str(tmp_path / "ref-prefect")}, tiny_data)  # fmt: skip
    with servers.running(timeout=240):
        assert ref.wait(timeout=600) == 0, ref.stdout.read()[-3000:]
        env |= {"PREFECT_API_URL": servers.prefect_api, "PREFECT_HOME": str(tmp_path / "client"),
                "PREFECT_WORKER_QUERY_SECONDS": "1"}  # fmt: skip
        deploy = subprocess.run(
            [sys.executable, "-m", "flows.pool", "deploy", "--pool", "cpu", "--workers", "2",
             "--zombie-after", "40"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert deploy.returncode == 0, deploy.stdout + deploy.stderr
        job_env = slurm_env(slurm) | {k: v for k, v in env.items() if k != "PATH"}
        workers = {
            name: slurm.sbatch(f"--job-name={name}", "--ntasks=1", f"--chdir={ROOT}",
                               f"--output={tmp_path / name}.log",
                               str(ROOT / "flows/slurm/pool-workers.sbatch"), "cpu", env=job_env)
            for name in ("w1", "w2")
        }  # fmt: skip
        params = write_params(tmp_path / "params.yaml", grid=GRID | {"work_pool": "cpu"})
        results = tmp_path / "results"
        grid = _grid(params, results, servers.mlflow_url, env, tiny_data)
        client = MlflowClient(servers.mlflow_url)
        try:
            # kill w1 once a point it runs, not the first of its chain, has started: it still
            # has the rest of its trunk and its cooldown to train (its own metrics.jsonl appears
            # only at the cooldown, the last 20% of its steps: too late to aim at)
            victim, deadline = None, time.monotonic() + 300
            while victim is None and time.monotonic() < deadline and grid.poll() is None:
                exp = client.get_experiment_by_name("nmm-pool")
                runs = client.search_runs([exp.experiment_id], "tags.worker = 'w1'") if exp else []
                for r in runs:
                    pid, tokens = r.data.tags["point_id"], int(r.data.tags["tokens"])
                    pdir = records.point_dir(results, pid)
                    started = (pdir / "train.log").exists()
                    cooling = (pdir / "metrics.jsonl").exists()
                    done = records.record_path(results, pid).exists()
                    if tokens > 4096 and started and not cooling and not done:
                        victim = pid
                        break
                time.sleep(0.05)
            assert victim is not None, "no w1 point was caught before its cooldown"
            slurm.run("scancel", workers["w1"])
            assert not records.record_path(results, victim).exists()  # it died mid-point
            out, _ = grid.communicate(timeout=600)
            assert grid.returncode == 0, out[-4000:]
        finally:
            for job in workers.values():
                slurm.run("scancel", job)
            if grid.poll() is None:
                _kill_tree(grid)

        # every point once, one MLflow run each, the uninterrupted numbers
        exp = client.get_experiment_by_name("nmm-pool")
        points = client.search_runs([exp.experiment_id], "tags.`nmm.kind` = 'point'")
        assert len(points) == 6 and len({r.data.tags["point_id"] for r in points}) == 6
        assert all(r.info.status == "FINISHED" for r in points)
        assert {r.data.tags["worker"] for r in points} == {"w1", "w2"}  # both workers trained
        assert (
            next(r for r in points if r.data.tags["point_id"] == victim).data.tags["worker"] == "w2"
        )
        table = {r["point_id"]: r for r in records.read_table(results / "runs.parquet")}
        expected = {r["point_id"]: r for r in records.read_table(tmp_path / "ref" / "runs.parquet")}
        assert set(table) == set(expected) and len(table) == 6
        for pid, row in table.items():
            assert row["status"] == "ok"
            for k in LOSSES:
                assert row[k] == pytest.approx(expected[pid][k], rel=1e-6, abs=1e-7), (pid, k)

        # Prefect: the killed chain crashed and ran again; never more than 2 chains at once
        runs = _json(f"{servers.prefect_api}/flow_runs/filter", {})
        chains = [r for r in runs if r["name"].startswith("early-")]
        states = sorted(r["state"]["type"] for r in chains)
        assert states == ["COMPLETED", "COMPLETED", "CRASHED"], states
        spans = [(r["start_time"], r["end_time"] or r["state"]["timestamp"]) for r in chains]
        for t, _ in spans:
            assert sum(s <= t < e for s, e in spans) <= 2

        # cancelling the grid cancels its chains: no worker runs now, so they wait, Scheduled
        params2 = write_params(tmp_path / "params2.yaml", grid=GRID | {"work_pool": "cpu",
                               "tokens": [2048, 6144]})  # fmt: skip
        grid2 = _grid(params2, tmp_path / "results2", servers.mlflow_url, env, tiny_data)
        try:
            waiting, deadline = [], time.monotonic() + 120
            while len(waiting) < 2 and time.monotonic() < deadline:
                runs = _json(f"{servers.prefect_api}/flow_runs/filter", {})
                waiting = [r for r in runs if r["name"].startswith("early-")
                           and r["state"]["type"] == "SCHEDULED"]  # fmt: skip
                time.sleep(0.5)
            assert len(waiting) == 2, "the grid did not submit its 2 chains"
            [parent] = [r for r in runs if r["state"]["type"] == "RUNNING"
                        and not r["name"].startswith("early-")]  # fmt: skip
            _json(f"{servers.prefect_api}/flow_runs/{parent['id']}/set_state",
                  {"state": {"type": "CANCELLING"}, "force": True})  # fmt: skip
            grid2.communicate(timeout=120)
            assert grid2.returncode != 0  # it stopped, it did not finish
        finally:
            if grid2.poll() is None:
                _kill_tree(grid2)
        ids = {r["id"] for r in waiting}
        # a pool nobody deployed: named, with the command that creates it, before any work
        params3 = write_params(tmp_path / "params3.yaml",
                               grid=GRID | {"work_pool": "nope", "tokens": [3072]})  # fmt: skip
        grid3 = _grid(params3, tmp_path / "results3", servers.mlflow_url, env, tiny_data)
        out3, _ = grid3.communicate(timeout=300)
        assert grid3.returncode != 0
        assert (
            "no deployment 'train-chain/nope'" in out3 and "flows.pool deploy --pool nope" in out3
        )
        runs = _json(f"{servers.prefect_api}/flow_runs/filter", {})
        assert {r["state"]["type"] for r in runs if r["id"] in ids} == {"CANCELLED"}
