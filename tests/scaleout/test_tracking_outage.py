"""The MLflow tracking server killed for 30 s (three of the grid's retry pauses) in the middle
of a grid (flows/tracking.py): the points train on (some finish while it is down), their runs'
calls are kept and made when it is back, and the grid ends with every point trained once, one
finished run per point, every step of every curve in MLflow once, and the final metrics of
every record."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from flows import records
from flows.ui import HOST, MLFLOW_SERVER_ENV, free_port, wait_http
from stages.common.paths import ROOT
from tests.flows.conftest import write_params

GRID = {"archs": ["early"], "sizes": ["xxs", "xs"], "tokens": [2048, 4096, 32768],
        "study": "outage", "workers": 2}  # fmt: skip
OUTAGE_S = 30


def _mlflow_server(port: int, store: Path, log: Path) -> subprocess.Popen:
    bin_dir = Path(sys.executable).parent
    proc = subprocess.Popen(
        [str(bin_dir / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
         "--default-artifact-root", (store / "artifacts").as_uri(), "--host", HOST,
         "--port", str(port), "--workers", "1"],
        cwd=ROOT, stdout=log.open("a"), stderr=subprocess.STDOUT, start_new_session=True,
        env=dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true", **MLFLOW_SERVER_ENV),
    )  # fmt: skip
    wait_http(f"http://{HOST}:{port}/health", 180, proc)
    return proc


def _stop(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.mark.scaleout
@pytest.mark.slow
def test_a_tracking_server_killed_for_30_s_mid_grid_loses_and_duplicates_nothing(
    tiny_data, tmp_path
):
    store = tmp_path / "mlflow"
    store.mkdir()
    port = free_port()
    uri = f"http://{HOST}:{port}"
    server = _mlflow_server(port, store, tmp_path / "mlflow.log")
    results = tmp_path / "results"
    params = write_params(tmp_path / "params.yaml", grid=GRID)
    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "prefect"))
    env.pop("MLFLOW_TRACKING_URI", None)
    grid = subprocess.Popen(
        [sys.executable, "-m", "flows.grid", "run", "--params", str(params),
         "--shards", str(tiny_data.shards), "--codebook", str(tmp_path / "none.pt"),
         "--results", str(results), "--tracking-uri", uri],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while not list(results.glob("points/*/record.json")) and time.monotonic() < deadline:
            assert grid.poll() is None, grid.stdout.read()[-3000:]
            time.sleep(0.2)
        # one point has ended; the others are training. Killed, not stopped: a graceful stop
        # took 5-20 s, long enough for every remaining point to end before the outage began
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
        stopped = time.time()
        time.sleep(OUTAGE_S)
        during = [p for p in results.glob("points/*/record.json") if p.stat().st_mtime > stopped]
        assert grid.poll() is None or during, "the grid ended before the outage"
        server = _mlflow_server(port, store, tmp_path / "mlflow.log")
        out, _ = grid.communicate(timeout=600)
    finally:
        if grid.poll() is None:
            grid.kill()
        _stop(server)
    assert grid.returncode == 0, out[-3000:]
    assert during, "no point finished while the server was down: training waited for it"
    assert "unreachable" in out and "is back" in out
    # no point task failed on a tracking call: MLflow's errors, or requests' (urllib3 names the
    # pool); a retry for another reason (Prefect's API) starts no process
    retried = [line for line in out.splitlines() if "Task run failed with exception" in line]
    tracking = ("Mlflow", "HTTPConnectionPool", "ChunkedEncodingError")
    assert not [line for line in retried if any(t in line for t in tracking)], retried

    recs = {r["point_id"]: r for r in map(json.loads, (p.read_text() for p in
            results.glob("points/*/record.json")))}  # fmt: skip
    assert len(recs) == 6 and all(r["status"] == "ok" for r in recs.values())
    client = MlflowClient(uri)
    server = _mlflow_server(port, store, tmp_path / "mlflow.log")  # to read it back
    try:
        exp = client.get_experiment_by_name("nmm-outage")
        runs = client.search_runs([exp.experiment_id], "tags.`nmm.kind` = 'point'")
        assert sorted(r.data.tags["point_id"] for r in runs) == sorted(recs)  # one run each
        for run in runs:
            pid = run.data.tags["point_id"]
            rec = recs[pid]
            assert run.info.status == "FINISHED" and run.data.tags["status"] == "ok"
            assert rec["mlflow_run_id"] == run.info.run_id
            pdir = records.point_dir(results, pid)
            starts = (pdir / "train.log").read_text().count("=== ")
            assert starts == 1, f"{pid} started {starts} times; the grid's output:\n{out[-6000:]}"
            steps = [json.loads(line)["step"] for line in (pdir / "metrics.jsonl").open()
                     if "train_loss" in line]  # fmt: skip
            history = client.get_metric_history(run.info.run_id, "train_loss")
            assert [m.step for m in history] == steps  # every step, once
            assert run.data.metrics["final/loss_avg"] == pytest.approx(rec["loss_avg"])
        [launch] = client.search_runs([exp.experiment_id], "tags.`nmm.kind` = 'launch'")
        assert launch.info.status == "FINISHED"
        assert launch.data.metrics["launch/mlflow_outages"] > 0
    finally:
        _stop(server)
