"""Screenshot the MLflow comparison view docs/uis.md describes, on a real store.

Starts an MLflow server (loopback, a free port) on the store a grid wrote, opens the grid's
experiment in headless Chromium (DevTools protocol over a websocket), puts in the page's own
storage what the clicks of docs/uis.md would (the point runs only; columns final/loss_avg, final/N,
final/D, final/C, arch, size; runs coloured by arch; a scatter chart of final/loss_avg against
final/C), and saves the table and the chart as PNGs.

    python docs/mlflow_comparison_view.py [--tracking-uri sqlite:///mlflow.db]
        [--experiment nmm-default] [--out docs/screenshots]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

from mlflow import MlflowClient
from websockets.sync.client import connect

from flows.ui import free_port, wait_http
from stages.common.paths import ROOT

COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2"]
COLUMNS = ["final/loss_avg", "final/N", "final/D", "final/C"]


class Page:
    """One Chromium tab over the DevTools protocol."""

    def __init__(self, ws_url: str):
        self.ws, self.n = connect(ws_url, max_size=2**27), 0

    def call(self, method: str, **params) -> dict:
        self.n += 1
        self.ws.send(json.dumps({"id": self.n, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.n:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def goto(self, url: str, settle: float) -> None:
        self.call("Page.navigate", url=url)
        time.sleep(settle)

    def shot(self, png: Path) -> None:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        png.write_bytes(base64.b64decode(data))


def ui_state(experiment_id: str, runs: list) -> tuple[str, dict]:
    """The experiment page's persisted state (localStorage) the clicks of docs/uis.md produce."""
    section = str(uuid.uuid4())
    chart = {
        "uuid": str(uuid.uuid4()),
        "type": "SCATTER",
        "runsCountToCompare": 500,
        "metricSectionId": section,
        "deleted": False,
        "isGenerated": False,
        "displayName": "final/loss_avg against final/C (colour: arch)",
        "xaxis": {"key": "final/C", "type": "METRIC"},
        "yaxis": {"key": "final/loss_avg", "type": "METRIC"},
        "xAxisScaleType": "log",
        "scaleType": "log",
    }
    state = {
        "searchFilter": "tags.`nmm.kind` = 'point'",
        "orderByKey": "metrics.`final/C`",
        "orderByAsc": False,
        "startTime": "ALL",
        "lifecycleFilter": "Active",
        "datasetsFilter": [],
        "modelVersionFilter": "All Runs",
        "selectedColumns": [f"metrics.`{c}`" for c in COLUMNS] + ["tags.`arch`", "tags.`size`"],
        "runsHiddenMode": "SHOW_ALL",
        "runsPinned": [],
        "runsHidden": [],
        "runsExpanded": {},
        "runsVisibilityMap": {},
        "compareRunSections": [
            {
                "uuid": section,
                "name": "Scaling",
                "display": True,
                "isReordered": False,
                "columns": 1,
                "cardHeight": 560,
            }
        ],
        "compareRunCharts": [chart],
        "isAccordionReordered": True,
        "hideEmptyCharts": True,
        "useGroupedValuesInCharts": False,
        "groupBy": None,
        "viewMaximized": False,
        "runListHidden": False,
    }
    key = f'MLflowLocalStorage-1.1-ExperimentPage-["{experiment_id}"]-ReactComponentState'
    archs = sorted({r.data.tags.get("arch", "?") for r in runs})
    colours = {
        r.info.run_id: COLOURS[archs.index(r.data.tags.get("arch", "?")) % len(COLOURS)]
        for r in runs
    }
    return key, {"state": state, "colours": colours, "archs": archs}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tracking-uri", default=f"sqlite:///{ROOT / 'mlflow.db'}")
    ap.add_argument("--artifacts", default=str(ROOT / "mlruns"))
    ap.add_argument("--experiment", default="nmm-default")
    ap.add_argument("--out", default=str(ROOT / "docs" / "screenshots"))
    args = ap.parse_args(argv)
    client = MlflowClient(args.tracking_uri)
    exp = client.get_experiment_by_name(args.experiment)
    if exp is None:
        print(f"error: no experiment {args.experiment!r} in {args.tracking_uri}", file=sys.stderr)
        return 2
    runs = client.search_runs([exp.experiment_id], "tags.`nmm.kind` = 'point'", max_results=1000)
    key, ui = ui_state(exp.experiment_id, runs)
    chromium = shutil.which("chromium")
    if chromium is None:
        print("error: chromium is not installed (`make browser`)", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    port, cdp = free_port(), free_port()
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as tmp:
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port",
             str(port), "--backend-store-uri", args.tracking_uri,
             "--default-artifact-root", args.artifacts, "--workers", "1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env=dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"),  # no job runner
        )  # fmt: skip
        browser = subprocess.Popen(
            [chromium, "--headless=new", "--no-sandbox", "--disable-gpu",
             "--window-size=1600,1000", f"--remote-debugging-port={cdp}",
             f"--user-data-dir={tmp}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            wait_http(f"{base}/health", 120, server)
            wait_http(f"http://127.0.0.1:{cdp}/json/version", 120, browser)
            [tab] = [t for t in json.load(urllib.request.urlopen(f"http://127.0.0.1:{cdp}/json"))
                     if t["type"] == "page"][:1]  # fmt: skip
            page = Page(tab["webSocketDebuggerUrl"])
            page.call("Emulation.setDeviceMetricsOverride", width=1600, height=1000,
                      deviceScaleFactor=1, mobile=False)  # fmt: skip
            page.goto(f"{base}/", 5)
            page.call(
                "Runtime.evaluate",
                expression=(
                    f"localStorage.setItem({json.dumps(key)}, {json.dumps(json.dumps(ui['state']))});"
                    f"localStorage.setItem('experimentRunColors', "
                    f"{json.dumps(json.dumps(ui['colours']))});"
                    "localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');"
                ),
            )
            runs_url = f"{base}/#/experiments/{exp.experiment_id}/runs"
            page.goto(runs_url, 2)
            page.call("Page.reload")  # the app reads the run colours and panels when it starts
            time.sleep(15)
            page.shot(out / "mlflow-comparison-table.png")
            page.goto(runs_url + "?compareRunsMode=CHART", 15)
            page.shot(out / "mlflow-comparison-chart.png")
        finally:
            browser.terminate()
            server.terminate()
            browser.wait(30)
            server.wait(30)
    legend = ", ".join(f"{a} {COLOURS[i % len(COLOURS)]}" for i, a in enumerate(ui["archs"]))
    print(f"{len(runs)} point runs; colours: {legend}; wrote {out}/mlflow-comparison-*.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
