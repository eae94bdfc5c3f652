"""The UIs (flows/ui.py): real MLflow and Prefect servers, a grid started through the Prefect
deployment, a fit registered through the MLflow server, REST checks, and headless-Chromium
screenshots of both UIs (Debian's chromium, installed by `make test`).

With SCREENSHOTS_DIR set (`make screenshots`), the screenshots are also copied there (the
docs/screenshots/, shown in docs/uis.md).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import psutil
import pytest
from PIL import Image

from flows.ui import Servers, free_port, port_in_use
from stages.common.paths import ROOT
from stages.fit import run_fit
from stages.params import validate_params
from tests.flows.conftest import grid_params, write_params

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
]  # fmt: skip
GRID = {"archs": ["early"], "sizes": ["xxs", "xs"], "tokens": [2048, 4096, 6144], "study": "ui"}


def _json(url: str, body: dict | None = None) -> dict | list:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def _poll(fn, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(2)
    raise AssertionError(f"timed out waiting for {what}")


def browse(url: str, png: Path, profile: Path) -> str:
    """Screenshot ``url`` into ``png`` and return the rendered DOM (both after 15 s of JS)."""
    exe = shutil.which("chromium")
    assert exe, "chromium is not installed: `make test` installs Debian's chromium"
    common = [exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=15000",
              "--window-size=1400,900"]  # fmt: skip
    subprocess.run([*common, f"--screenshot={png}", url], check=True, capture_output=True,
                   timeout=180)  # fmt: skip
    dom = subprocess.run([*common, "--dump-dom", url], check=True, capture_output=True,
                         text=True, timeout=180)  # fmt: skip
    return dom.stdout


def assert_rendered(png: Path) -> None:
    """Not a blank or loading page: many distinct colours and real contrast."""
    img = np.asarray(Image.open(png).convert("RGB"))
    assert img.shape[:2] == (900, 1400)
    colours = len(np.unique(img.reshape(-1, 3), axis=0))
    assert colours > 50 and img.std() > 10, f"{png.name} looks blank ({colours} colours)"


@pytest.mark.slow
def test_both_uis_show_a_grid_started_from_the_prefect_deployment(tiny_data, tmp_path):
    params_path = write_params(tmp_path / "params.yaml", grid=GRID)
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    servers = Servers(
        free_port(), free_port(), store, tmp_path / "mlruns", tmp_path / "prefect",
        tmp_path / "logs", ["--params", str(params_path), "--tracking-uri", store],
    )  # fmt: skip
    with servers.running(timeout=240):
        api, ml = servers.prefect_api, f"{servers.mlflow_url}/api/2.0/mlflow"
        # the deployment is listed; start a grid from it, with parameters, as the UI does
        deployments = _poll(lambda: _json(f"{api}/deployments/filter", {}), 120, "deployment")
        dep = next(d for d in deployments if d["name"] == "grid")
        results = tmp_path / "results"
        run = _json(f"{api}/deployments/{dep['id']}/create_flow_run", {"parameters": {
            "params_path": str(params_path), "shards": str(tiny_data.shards),
            "codebook": str(tmp_path / "none.pt"), "results": str(results),
            "tracking_uri": servers.mlflow_url,
        }})  # fmt: skip

        def finished():
            state = _json(f"{api}/flow_runs/{run['id']}")["state"]["type"]
            assert state not in ("FAILED", "CRASHED", "CANCELLED"), (
                state, (servers.logs / "grid-serve.log").read_text()[-3000:])  # fmt: skip
            return state == "COMPLETED"

        _poll(finished, 400, "the grid flow run")
        tasks = _json(f"{api}/task_runs/filter", {"flow_runs": {"id": {"any_": [run["id"]]}}})
        point_tasks = [t for t in tasks if t["name"].startswith("early-")]
        assert len(point_tasks) == 6 and {t["state"]["type"] for t in point_tasks} == {"COMPLETED"}

        # MLflow: the study's experiment holds a parent run and one child run per point
        exp = _json(f"{ml}/experiments/get-by-name?experiment_name=nmm-ui")["experiment"]
        runs = _json(f"{ml}/runs/search", {"experiment_ids": [exp["experiment_id"]]})["runs"]
        points = [r for r in runs if {"key": "nmm.kind", "value": "point"} in r["data"]["tags"]]
        assert len(points) == 6
        for r in points:
            metrics = {m["key"] for m in r["data"]["metrics"]}
            assert {f"final/{k}" for k in ("loss_avg", "loss_caption", "N", "D", "C")} <= metrics

        # the fit stage, through the server: a registered, versioned model per arch
        fit = validate_params(grid_params(grid=GRID, fit={
            "bootstrap": 5, "mlflow": {"tracking_uri": servers.mlflow_url},
            "init": {"alpha": [0, 0.5, 2.5], "beta": [0, 0.5, 2.5], "e": [-1, 0.5]},
        })).fit  # fmt: skip
        run_fit(results / "runs.parquet", tmp_path / "fits.json", fit, plots=tmp_path / "plots")
        versions = _json(f"{ml}/model-versions/search?filter=name%3D%27scaling-law-early%27")
        assert len(versions["model_versions"]) >= 1

        # the UIs render what the APIs hold
        shots = tmp_path / "shots"
        shots.mkdir()
        pages = {
            "mlflow-runs.png": (f"{servers.mlflow_url}/#/experiments/{exp['experiment_id']}/runs"
                                "?searchFilter=tags.%60nmm.kind%60%3D%27point%27",
                                ["early-xxs", "early-xs"]),
            "mlflow-models.png": (f"{servers.mlflow_url}/#/models", ["scaling-law-early"]),
            "prefect-deployments.png": (f"{servers.prefect_url}/deployments", ["grid"]),
            "prefect-grid-run.png": (f"{servers.prefect_url}/runs/flow-run/{run['id']}",
                                     [run["name"]]),
        }  # fmt: skip
        for name, (url, expected) in pages.items():
            dom = browse(url, shots / name, tmp_path / "chromium")
            assert_rendered(shots / name)
            missing = [t for t in expected if t not in dom]
            assert not missing, f"{url} rendered without {missing}"
    if os.environ.get("SCREENSHOTS_DIR"):
        out = Path(os.environ["SCREENSHOTS_DIR"])
        out.mkdir(parents=True, exist_ok=True)
        for png in shots.glob("*.png"):
            shutil.copy2(png, out / png.name)


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_signal_to_the_ui_command_stops_every_server_it_started(tmp_path, sig):
    """`kill` of `python -m flows.ui` (or a closed terminal) takes its servers with it: no
    process it started is left, both ports are free for the next `make ui`."""
    ports = free_port(), free_port()
    cmd = [sys.executable, "-m", "flows.ui", "--mlflow-port", str(ports[0]),
           "--prefect-port", str(ports[1]), "--store", f"sqlite:///{tmp_path / 'm.db'}",
           "--artifacts", str(tmp_path / "mlruns"), "--no-serve"]  # fmt: skip
    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "prefect"))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        for line in proc.stdout:  # up when it says how to stop it
            if "Ctrl-C stops" in line:
                break
        assert proc.poll() is None, "flows.ui exited before its servers were up"
        started = psutil.Process(proc.pid).children(recursive=True)
        assert len(started) >= 2 and all(port_in_use(p) for p in ports)
        proc.send_signal(sig)
        assert proc.wait(timeout=90) == 0
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(map(_alive, started)):
            time.sleep(0.5)
        assert not [p.pid for p in started if _alive(p)]
        assert not any(port_in_use(p) for p in ports)
    finally:
        if proc.poll() is None:
            proc.kill()
