"""The team's servers on real stores: MLflow on PostgreSQL with its artifacts on S3, Prefect on
PostgreSQL (flows/ui.py ``Servers``, what ``python -m flows.ui --store ... --artifacts s3://...
--prefect-db ...`` starts). A grid launched as a user launches it, with no database or storage
credentials, writes its runs, records and artifacts through the servers; a fit registers a
model version; everything is read back through the servers and found in PostgreSQL and S3."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient

from flows import records
from flows.ui import Servers, free_port
from stages.common.paths import ROOT
from stages.fit import run_fit
from stages.params import validate_params
from tests.flows.conftest import grid_params, write_params
from tests.flows.test_ui import _json

GRID = {"archs": ["early"], "sizes": ["xxs", "xs"], "tokens": [2048, 4096, 6144],
        "study": "servers"}  # fmt: skip
LOSSES = ("loss_avg", "loss_caption", "loss_interleaved", "loss_text", "N", "D", "C")
STORE_SECRETS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_S3_ENDPOINT_URL")


@pytest.mark.scaleout
@pytest.mark.slow
def test_a_grid_and_a_fit_go_through_servers_on_postgresql_and_s3(
    postgres, s3, tiny_data, tmp_path, monkeypatch
):
    mlflow_db = postgres.create_db("mlflow")
    postgres.create_db("prefect")
    prefect_db = postgres.url("prefect", "postgresql+asyncpg")
    bucket = s3.bucket("nmm-team")
    for k, v in s3.env.items():  # the servers' environment: only they hold the S3 credentials
        monkeypatch.setenv(k, v)
    servers = Servers(
        free_port(), free_port(), mlflow_db, f"s3://{bucket}/mlflow", tmp_path / "prefect",
        tmp_path / "logs", None, prefect_db,
    )  # fmt: skip
    with servers.running(timeout=240):
        params = write_params(tmp_path / "params.yaml", grid=GRID)
        results = tmp_path / "results"
        env = {k: v for k, v in os.environ.items() if k not in STORE_SECRETS}
        env |= {"PREFECT_API_URL": servers.prefect_api, "PREFECT_HOME": str(tmp_path / "client")}
        env.pop("MLFLOW_TRACKING_URI", None)
        grid = subprocess.run(
            [sys.executable, "-m", "flows.grid", "run", "--params", str(params),
             "--shards", str(tiny_data.shards), "--codebook", str(tmp_path / "none.pt"),
             "--results", str(results), "--tracking-uri", servers.mlflow_url],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert grid.returncode == 0, grid.stdout[-3000:] + grid.stderr[-3000:]

        # MLflow, through the server: 6 point runs with their final metrics and records
        client = MlflowClient(servers.mlflow_url)
        exp = client.get_experiment_by_name("nmm-servers")
        points = client.search_runs([exp.experiment_id], "tags.`nmm.kind` = 'point'")
        assert len(points) == 6
        assert all("final/loss_avg" in r.data.metrics for r in points)
        run = points[0]
        assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # proxied by the server
        record = Path(client.download_artifacts(run.info.run_id, "record.json", str(tmp_path)))
        assert json.loads(record.read_text())["point_id"] == run.data.tags["point_id"]

        # ... kept in PostgreSQL and S3
        n_runs = int(postgres.psql("SELECT count(*) FROM runs", db="mlflow"))
        assert n_runs == 6 + 1  # the points and the launch
        keys = [o["Key"] for o in s3.client().list_objects_v2(Bucket=bucket)["Contents"]]
        assert any(k.startswith("mlflow/") and k.endswith(f"{run.info.run_id}/artifacts/record.json")
                   for k in keys), keys[:10]  # fmt: skip

        # runs.parquet again, from the store alone (what a machine that trained none of it
        # does): the same rows
        collected = subprocess.run(
            [sys.executable, "-m", "flows.grid", "collect", "--params", str(params),
             "--shards", str(tiny_data.shards), "--codebook", str(tmp_path / "none.pt"),
             "--results", str(tmp_path / "elsewhere"), "--tracking-uri", servers.mlflow_url],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert collected.returncode == 0, collected.stdout + collected.stderr
        assert "6 points collected (6 ok, 0 failed), 0 missing" in collected.stdout
        local = {r["point_id"]: r for r in records.read_table(results / "runs.parquet")}
        remote = records.read_table(tmp_path / "elsewhere" / "runs.parquet")
        assert [r["point_id"] for r in remote] == list(local)  # grid order
        for r in remote:
            assert {k: r[k] for k in LOSSES} == {k: local[r["point_id"]][k] for k in LOSSES}
            assert r["mlflow_run_id"] == local[r["point_id"]]["mlflow_run_id"]

        # Prefect, on PostgreSQL: the grid's flow run and one task run per point
        flows = _json(f"{servers.prefect_api}/flow_runs/filter", {})
        [flow] = [f for f in flows if f["flow_id"] and f["state"]["type"] == "COMPLETED"]
        tasks = _json(f"{servers.prefect_api}/task_runs/filter",
                      {"flow_runs": {"id": {"any_": [flow["id"]]}}})  # fmt: skip
        assert sum(t["name"].startswith("early-") for t in tasks) == 6
        assert int(postgres.psql("SELECT count(*) FROM flow_run", db="prefect")) == 1

        # the fit registers a model version through the server; its files land in S3
        fit = validate_params(grid_params(grid=GRID, fit={
            "bootstrap": 5, "mlflow": {"tracking_uri": servers.mlflow_url},
            "init": {"alpha": [0, 0.5, 2.5], "beta": [0, 0.5, 2.5], "e": [-1, 0.5]},
        })).fit  # fmt: skip
        with monkeypatch.context() as m:  # the fit is a client too: no storage credentials
            for k in STORE_SECRETS:
                m.delenv(k, raising=False)
            run_fit(results / "runs.parquet", tmp_path / "fits.json", fit)
        [version] = client.search_model_versions("name='scaling-law-early'")
        assert int(postgres.psql("SELECT count(*) FROM model_versions", db="mlflow")) == 1
        keys = [o["Key"] for o in s3.client().list_objects_v2(Bucket=bucket)["Contents"]]
        assert any("MLmodel" in k for k in keys)
        assert version.status == "READY"


def _status(url: str, body: dict | None = None, auth: str | None = None) -> int:
    req = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})  # fmt: skip
    if auth:
        import base64

        req.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.mark.scaleout
@pytest.mark.slow
def test_with_auth_a_request_without_credentials_is_refused_and_the_grid_with_them_runs(
    tiny_data, tmp_path, monkeypatch
):
    creds = {"MLFLOW_TRACKING_USERNAME": "team", "MLFLOW_TRACKING_PASSWORD": "a-long-test-secret",
             "PREFECT_API_AUTH_STRING": "team:a-long-test-secret"}  # fmt: skip
    for k, v in creds.items():
        monkeypatch.setenv(k, v)
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    servers = Servers(free_port(), free_port(), store, tmp_path / "mlruns", tmp_path / "prefect",
                      tmp_path / "logs", None, None, auth=True)  # fmt: skip
    with servers.running(timeout=240):
        ml, api = f"{servers.mlflow_url}/api/2.0/mlflow", servers.prefect_api
        search = f"{ml}/experiments/search?max_results=10"
        assert _status(search) == 401
        assert _status(search, auth="team:wrong-password") == 401
        assert _status(search, auth="team:a-long-test-secret") == 200
        assert _status(f"{api}/flows/filter", {}) == 401
        assert _status(f"{api}/flows/filter", {}, auth="team:a-long-test-secret") == 200

        params = write_params(tmp_path / "params.yaml",
                              grid={"archs": ["early"], "study": "auth"})  # fmt: skip
        env = dict(os.environ, PREFECT_API_URL=api, PREFECT_HOME=str(tmp_path / "client"))
        cmd = [sys.executable, "-m", "flows.grid", "run", "--params", str(params),
               "--shards", str(tiny_data.shards), "--codebook", str(tmp_path / "none.pt"),
               "--results", str(tmp_path / "results"), "--tracking-uri", servers.mlflow_url]  # fmt: skip
        grid = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert grid.returncode == 0, grid.stdout[-3000:] + grid.stderr[-3000:]
        client = MlflowClient(servers.mlflow_url)  # the credentials of this environment
        exp = client.get_experiment_by_name("nmm-auth")
        assert len(client.search_runs([exp.experiment_id], "tags.`nmm.kind` = 'point'")) == 2

        # without credentials a grid is turned away
        bare = {k: v for k, v in env.items() if k not in creds}
        refused = subprocess.run([*cmd[:-3], str(tmp_path / "other"), *cmd[-2:]], cwd=ROOT,
                                 env=bare, capture_output=True, text=True, timeout=600)  # fmt: skip
        out = refused.stdout + refused.stderr
        assert refused.returncode != 0 and ("401" in out or "Unauthorized" in out), out[-2000:]
        assert not (tmp_path / "other" / "runs.parquet").exists()


@pytest.mark.scaleout
def test_servers_refuse_to_leave_loopback_without_auth_or_credentials(tmp_path, monkeypatch):
    """Checked before anything starts: no server process is spawned."""
    open_ = Servers(free_port(), free_port(), "sqlite:///x.db", tmp_path / "a", tmp_path / "p",
                    tmp_path / "logs", bind="0.0.0.0")  # fmt: skip
    with pytest.raises(RuntimeError, match="requires --auth"):
        open_.start()
    for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "PREFECT_API_AUTH_STRING"):
        monkeypatch.delenv(k, raising=False)
    locked = Servers(free_port(), free_port(), "sqlite:///x.db", tmp_path / "a", tmp_path / "p",
                     tmp_path / "logs", auth=True)  # fmt: skip
    with pytest.raises(RuntimeError, match="MLFLOW_TRACKING_USERNAME"):
        locked.start()
    assert open_.procs == {} and locked.procs == {}
