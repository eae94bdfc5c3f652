"""The two UIs of the study, one command: ``make ui`` (``python -m flows.ui``).

Starts, bound to 127.0.0.1,
- an MLflow server on the project's store (``sqlite:///<repo>/mlflow.db``, artifacts in
  ``mlruns/``, what the grid and fit stages write): the study's experiment ``nmm-<study>`` has a
  parent run per grid and one child run per point; the fits are in ``nmm-scaling-fits`` and the
  registered models ``scaling-law-<arch>``;
- a Prefect server (state in ``$PREFECT_HOME``, default ``.prefect``);
- ``python -m flows.grid serve``: the grid deployment ``nmm-grid/grid``, so that grids can be
  started (with parameters) and scheduled from the Prefect UI; they run in this checkout;

prints their URLs and runs until Ctrl-C, then stops all three. Ports default to 5000 and 4200
(``--mlflow-port``, ``--prefect-port``; 0 picks free ones).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from stages.common.mlflow_store import local_store

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def port_in_use(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex((HOST, port)) == 0


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    """Poll ``url`` until it answers 200; fail early if ``proc`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{' '.join(map(str, proc.args))} exited with {proc.returncode}")
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=5) as r:
            if r.status == 200:
                return
        time.sleep(1)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")


@dataclass
class Servers:
    """MLflow + Prefect servers (and optionally the grid deployment) as child processes."""

    mlflow_port: int
    prefect_port: int
    store: str  # MLflow backend store URI
    artifacts: Path
    prefect_home: Path
    logs: Path
    serve_args: list[str] | None = None  # ``flows.grid serve`` options; None: no deployment
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def mlflow_url(self) -> str:
        return f"http://{HOST}:{self.mlflow_port}"

    @property
    def prefect_url(self) -> str:
        return f"http://{HOST}:{self.prefect_port}"

    @property
    def prefect_api(self) -> str:
        return f"{self.prefect_url}/api"

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            PREFECT_HOME=str(self.prefect_home),
            PREFECT_API_URL=self.prefect_api,
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            PREFECT_UI_API_URL=self.prefect_api,
            MLFLOW_TRACKING_URI=self.mlflow_url,
            MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
        )
        return env

    def _spawn(self, name: str, cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
        self.logs.mkdir(parents=True, exist_ok=True)
        log = open(self.logs / f"{name}.log", "wb")  # noqa: SIM115 (lives with the process)
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                start_new_session=True)  # fmt: skip
        self.procs[name] = proc
        return proc

    def start(self, timeout: float = 180) -> Servers:
        for port in (self.mlflow_port, self.prefect_port):
            if port_in_use(port):
                raise RuntimeError(f"port {port} on {HOST} is in use: choose another (0: free)")
        bin_dir = Path(sys.executable).parent
        env = self.env()
        env.pop("PREFECT_API_URL")  # the server itself must not be a client of itself
        mlflow = self._spawn("mlflow", [
            str(bin_dir / "mlflow"), "server", "--backend-store-uri", self.store,
            "--default-artifact-root", self.artifacts.resolve().as_uri(),
            "--host", HOST, "--port", str(self.mlflow_port), "--workers", "1",
        ], env)  # fmt: skip
        prefect = self._spawn("prefect", [
            str(bin_dir / "prefect"), "server", "start", "--host", HOST,
            "--port", str(self.prefect_port),
        ], env)  # fmt: skip
        wait_http(f"{self.mlflow_url}/health", timeout, mlflow)
        wait_http(f"{self.prefect_api}/health", timeout, prefect)
        if self.serve_args is not None:
            cmd = [sys.executable, "-m", "flows.grid", "serve", *self.serve_args]
            self._spawn("grid-serve", cmd, self.env())
        return self

    def stop(self) -> None:
        for proc in reversed(list(self.procs.values())):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    @contextlib.contextmanager
    def running(self, timeout: float = 180) -> Iterator[Servers]:
        try:
            yield self.start(timeout)
        finally:
            self.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m flows.ui",
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--mlflow-port", type=int, default=5000, help="(default %(default)s; 0: free)")
    ap.add_argument("--prefect-port", type=int, default=4200, help="(default %(default)s; 0: free)")
    ap.add_argument("--store", default=local_store(), help="MLflow store (default %(default)s)")
    ap.add_argument("--no-serve", action="store_true", help="do not serve the grid deployment")
    args = ap.parse_args(argv)
    servers = Servers(
        args.mlflow_port or free_port(),
        args.prefect_port or free_port(),
        args.store,
        ROOT / "mlruns",
        Path(os.environ.get("PREFECT_HOME", ROOT / ".prefect")),
        ROOT / ".ui-logs",
        None if args.no_serve else ["--tracking-uri", args.store],
    )
    print(f"starting MLflow and Prefect (logs in {servers.logs}) ...", flush=True)
    try:
        with servers.running():
            print(f"MLflow UI:  {servers.mlflow_url}  (experiments nmm-<study>, nmm-scaling-fits)")
            print(f"Prefect UI: {servers.prefect_url}  (Deployments -> nmm-grid/grid -> Run)")
            print("Ctrl-C stops the servers and the deployment.", flush=True)
            while all(p.poll() is None for p in servers.procs.values()):
                time.sleep(1)
            dead = [n for n, p in servers.procs.items() if p.poll() is not None]
            print(f"{', '.join(dead)} stopped: see {servers.logs}", file=sys.stderr)
            return 1
    except KeyboardInterrupt:
        return 0
    except (RuntimeError, TimeoutError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
