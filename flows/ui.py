"""The two UIs of the study, one command: ``make ui`` (``python -m flows.ui``).

Starts, bound to 127.0.0.1,
- an MLflow server on the project's store (``sqlite:///<repo>/mlflow.db``, artifacts in
  ``mlruns/``, what the grid and fit stages write): the study's experiment ``nmm-<study>`` has a
  run per grid launch and one run per point (tag ``nmm.launch`` names the launch); the fits are in ``nmm-scaling-fits`` and the
  registered models ``scaling-law-<arch>``;
- a Prefect server (state in ``$PREFECT_HOME``, default ``.prefect``);
- ``python -m flows.grid serve``: the grid deployment ``nmm-grid/grid``, so that grids can be
  started (with parameters) and scheduled from the Prefect UI; they run in this checkout;

prints their URLs and runs until Ctrl-C, SIGTERM or SIGHUP, then stops all three (each runs in
a process group of its own, stopped as a group; on Linux they also get SIGTERM if this process
dies without stopping them). Ports default to 5000 and 4200
(``--mlflow-port``, ``--prefect-port``; 0 picks free ones).

The same servers on shared stores, for a team or a cluster (docs/scale-out.md):
``--store postgresql+psycopg2://USER@HOST/mlflow`` (MLflow's runs and registry on PostgreSQL),
``--artifacts s3://BUCKET/mlflow`` (artifacts written by the MLflow server to object storage:
clients upload through it and need no storage credentials; ``MLFLOW_S3_ENDPOINT_URL`` and the
``AWS_*`` variables of this environment reach the bucket), ``--prefect-db
postgresql+asyncpg://USER@HOST/prefect`` (Prefect's state on PostgreSQL). Passwords come from
the environment or ~/.pgpass, never from params.yaml.

``--auth``: only the team gets in. MLflow runs its basic-auth app (admin user
``MLFLOW_TRACKING_USERNAME`` with password ``MLFLOW_TRACKING_PASSWORD``, the variables every
MLflow client reads; users in ``.ui-logs/mlflow-auth.db`` unless ``MLFLOW_AUTH_DATABASE_URI``),
Prefect requires ``PREFECT_API_AUTH_STRING`` (``user:password``, which Prefect's clients send).
All three come from the environment. ``--host 0.0.0.0`` (leaving loopback) requires ``--auth``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from stages.common.mlflow_store import local_store
from stages.common.paths import ROOT
from stages.common.processes import die_with_parent, stop_on_signals

HOST = "127.0.0.1"
AUTH_ENV = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "PREFECT_API_AUTH_STRING")
# an MLflow server here runs no job runner (its 7 huey consumer processes): no MLflow jobs are used
MLFLOW_SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


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
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except urllib.error.HTTPError as e:
            if e.code == 401:  # up, and asking for credentials (--auth)
                return
        except OSError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")


@dataclass
class Servers:
    """MLflow + Prefect servers (and optionally the grid deployment) as child processes."""

    mlflow_port: int
    prefect_port: int
    store: str  # MLflow backend store URI
    artifacts: Path | str  # a local folder, or a URI the MLflow server writes to (s3://...)
    prefect_home: Path
    logs: Path
    serve_args: list[str] | None = None  # ``flows.grid serve`` options; None: no deployment
    prefect_db: str | None = None  # Prefect's database URL (default: SQLite in prefect_home)
    auth: bool = False  # credentials from the environment (module docstring)
    bind: str = HOST  # the address the servers listen on; clients here use HOST
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
            **MLFLOW_SERVER_ENV,
        )
        return env

    def _spawn(self, name: str, cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
        self.logs.mkdir(parents=True, exist_ok=True)
        log = open(self.logs / f"{name}.log", "wb")  # noqa: SIM115 (lives with the process)
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                start_new_session=True, preexec_fn=die_with_parent)  # fmt: skip
        self.procs[name] = proc
        return proc

    def start(self, timeout: float = 180) -> Servers:
        for port in (self.mlflow_port, self.prefect_port):
            if port_in_use(port):
                raise RuntimeError(f"port {port} on {HOST} is in use: choose another (0: free)")
        bin_dir = Path(sys.executable).parent
        env = self.env()
        env.pop("PREFECT_API_URL")  # the server itself must not be a client of itself
        if self.prefect_db:
            env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = self.prefect_db
        auth: list[str] = []
        if self.auth:
            missing = [k for k in AUTH_ENV if not os.environ.get(k)]
            if missing:
                raise RuntimeError(f"--auth needs {', '.join(missing)} in the environment")
            self.logs.mkdir(parents=True, exist_ok=True)
            ini = self.logs / "mlflow-auth.ini"  # no secret in it: the password is env-only
            db = (
                os.environ.get("MLFLOW_AUTH_DATABASE_URI")
                or f"sqlite:///{self.logs}/mlflow-auth.db"
            )
            ini.write_text(
                f"[mlflow]\ndefault_permission = READ\ndatabase_uri = {db}\n"
                f"admin_username = {os.environ['MLFLOW_TRACKING_USERNAME']}\n"
                "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
            )
            env["MLFLOW_AUTH_CONFIG_PATH"] = str(ini)
            env["MLFLOW_AUTH_ADMIN_PASSWORD"] = os.environ["MLFLOW_TRACKING_PASSWORD"]
            # CSRF key of the auth app: yours (several servers must share one), or a fresh one
            env.setdefault("MLFLOW_FLASK_SERVER_SECRET_KEY", secrets.token_hex(32))
            env["PREFECT_SERVER_API_AUTH_STRING"] = os.environ["PREFECT_API_AUTH_STRING"]
            auth = ["--app-name", "basic-auth"]
        elif self.bind != HOST:
            raise RuntimeError(f"listening on {self.bind} (beyond loopback) requires --auth")
        if isinstance(self.artifacts, Path):  # written by the clients, beside the store
            artifacts = ["--default-artifact-root", self.artifacts.resolve().as_uri()]
        else:  # written by the server (proxied): clients need no storage credentials
            artifacts = ["--artifacts-destination", self.artifacts]
        mlflow = self._spawn("mlflow", [
            str(bin_dir / "mlflow"), "server", "--backend-store-uri", self.store, *artifacts,
            "--host", self.bind, "--port", str(self.mlflow_port), "--workers", "1", *auth,
            *([] if self.bind == HOST else ["--allowed-hosts", "*"]),
        ], env)  # fmt: skip
        prefect = self._spawn("prefect", [
            str(bin_dir / "prefect"), "server", "start", "--host", self.bind,
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
    ap.add_argument(
        "--artifacts",
        default=str(ROOT / "mlruns"),
        help="MLflow artifacts: a folder (default %(default)s) or s3://BUCKET/PATH",
    )
    ap.add_argument("--prefect-db", default=None,
                    help="Prefect's database (postgresql+asyncpg://...; default SQLite)")  # fmt: skip
    ap.add_argument("--no-serve", action="store_true", help="do not serve the grid deployment")
    ap.add_argument("--auth", action="store_true", help="require credentials (see above)")
    ap.add_argument("--host", default=HOST, help="listen on (default %(default)s; else --auth)")
    args = ap.parse_args(argv)
    mlflow_port = args.mlflow_port or free_port()
    # grids started from the deployment track to the SQLite file directly, or to a shared store
    # through the MLflow server (so their artifacts go where the server puts them)
    local = args.store.startswith("sqlite:")
    tracking = args.store if local else f"http://{HOST}:{mlflow_port}"
    servers = Servers(
        mlflow_port,
        args.prefect_port or free_port(),
        args.store,
        args.artifacts if "://" in args.artifacts else Path(args.artifacts),
        Path(os.environ.get("PREFECT_HOME", ROOT / ".prefect")),
        ROOT / ".ui-logs",
        None if args.no_serve else ["--tracking-uri", tracking],
        args.prefect_db,
        args.auth,
        args.host,
    )
    print(f"starting MLflow and Prefect (logs in {servers.logs}) ...", flush=True)
    try:
        with stop_on_signals(), servers.running():
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
