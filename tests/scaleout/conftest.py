"""Real servers on loopback for the scale-out tests: PostgreSQL and an S3-compatible store.

PostgreSQL is Debian's (``make test`` installs the ``postgresql`` package when it is missing);
``initdb`` and ``pg_ctl`` refuse to run as root, so as root they run as the ``postgres`` user
(``runuser``) in a directory of their own; the server listens on 127.0.0.1 at a free port,
with password authentication for TCP. The S3 is moto's server (``moto[server]`` from PyPI),
in memory, on 127.0.0.1 at a free port. Slurm is Debian's too (``make test`` installs it with
munge): a one-node cluster whose controller, node daemon and munge run in a directory of their
own, the node at 127.0.0.1. All live for the test session. A Ray cluster (``ray`` from PyPI) of
two nodes on loopback lives for one test.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from flows.ui import free_port

PG_USER, PG_PASSWORD = "nmm", "nmm-test-password"
S3_KEY, S3_SECRET, S3_REGION = "testing", "testing", "us-east-1"


def pg_bin(name: str) -> str:
    """A PostgreSQL program: Debian keeps them in /usr/lib/postgresql/<version>/bin."""
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=_version)
    path = found[-1] if found else shutil.which(name)
    if path is None:
        pytest.fail(
            f"PostgreSQL's {name} is not installed: `make test` installs Debian's postgresql"
        )
    return path


def _version(path: str) -> float:
    try:
        return float(Path(path).parents[1].name)
    except ValueError:
        return 0.0


@dataclass
class Postgres:
    port: int
    data: Path
    as_user: list[str]

    def url(self, db: str, driver: str = "postgresql+psycopg2") -> str:
        """SQLAlchemy's URL (its default PostgreSQL driver is psycopg 3; we ship psycopg2)."""
        return f"{driver}://{PG_USER}:{PG_PASSWORD}@127.0.0.1:{self.port}/{db}"

    def create_db(self, name: str) -> str:
        """A new database owned by the test role; its URL (psycopg2)."""
        self.psql(f'CREATE DATABASE "{name}" OWNER {PG_USER}')
        return self.url(name)

    def psql(self, sql: str, db: str = "postgres") -> str:
        out = subprocess.run(
            [*self.as_user, pg_bin("psql"), "-h", str(self.data), "-p", str(self.port), "-d", db,
             "-v", "ON_ERROR_STOP=1", "-tAc", sql],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
        return out.stdout.strip()


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    data = Path(tempfile.mkdtemp(prefix="nmm-pg-"))
    if as_user:
        shutil.chown(data, "postgres", "postgres")
    port = free_port()
    # the superuser is the OS user over the socket; the test role logs in with a password
    subprocess.run([*as_user, pg_bin("initdb"), "-D", str(data / "db"), "-A", "peer",
                    "--auth-host=scram-sha-256", "-E", "UTF8", "--locale=C"],
                   check=True, capture_output=True)  # fmt: skip
    log = data / "server.log"
    subprocess.run(
        [*as_user, pg_bin("pg_ctl"), "-D", str(data / "db"), "-l", str(log), "-w", "-t", "60",
         "-o", f"-p {port} -k {data} -c listen_addresses=127.0.0.1 -c fsync=off", "start"],
        check=True, capture_output=True,
    )  # fmt: skip
    pg = Postgres(port, data, as_user)
    try:
        pg.psql(f"CREATE ROLE {PG_USER} LOGIN PASSWORD '{PG_PASSWORD}' CREATEDB")
        yield pg
    finally:
        subprocess.run([*as_user, pg_bin("pg_ctl"), "-D", str(data / "db"), "-m", "immediate",
                        "-w", "stop"], capture_output=True)  # fmt: skip
        shutil.rmtree(data, ignore_errors=True)


@dataclass
class S3:
    endpoint: str

    @property
    def env(self) -> dict[str, str]:
        """What an S3 client (boto3, MLflow, DVC) needs to reach this store."""
        return {
            "AWS_ACCESS_KEY_ID": S3_KEY,
            "AWS_SECRET_ACCESS_KEY": S3_SECRET,
            "AWS_DEFAULT_REGION": S3_REGION,
            "MLFLOW_S3_ENDPOINT_URL": self.endpoint,
            "AWS_ENDPOINT_URL": self.endpoint,  # (boto3, s3fs: the checkpoint store)
        }

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=S3_KEY,
                            aws_secret_access_key=S3_SECRET, region_name=S3_REGION)  # fmt: skip

    def bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name


@pytest.fixture(scope="session")
def s3() -> Iterator[S3]:
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield S3(f"http://127.0.0.1:{port}")
    finally:
        server.stop()


SLURM_CONF = """\
ClusterName=nmmtest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.sock
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SlurmUser={user}
SlurmdUser={user}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
KillWait=5
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
NodeName={host} NodeAddr=127.0.0.1 CPUs=8 RealMemory=8000 State=UNKNOWN
PartitionName=test Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


@dataclass
class Slurm:
    """A one-node Slurm cluster on loopback: ``env`` for its clients (sbatch, srun, scancel)."""

    root: Path

    @property
    def env(self) -> dict[str, str]:
        return {"SLURM_CONF": str(self.root / "slurm.conf")}

    def run(self, *cmd: str, env: dict[str, str] | None = None) -> str:
        out = subprocess.run(cmd, env={**(env or os.environ), **self.env}, capture_output=True,
                             text=True, timeout=60)  # fmt: skip
        assert out.returncode == 0, f"{' '.join(cmd)}: {out.stdout}{out.stderr}"
        return out.stdout

    def sbatch(self, *args: str, env: dict[str, str] | None = None) -> str:
        """Submit a batch job; its id."""
        return self.run("sbatch", "--parsable", *args, env=env).strip().split(";")[0]

    def state(self, job: str) -> str:
        """The job's state (RUNNING, PENDING, ...), or '' once it left the queue."""
        return self.run("squeue", "-h", "-j", job, "-o", "%T").strip()


@pytest.fixture(scope="session")
def slurm() -> Iterator[Slurm]:
    """munged, slurmctld and slurmd (Debian's ``slurmctld``, ``slurmd``, ``slurm-client`` and
    ``munge``, installed by ``make test``) in a directory of their own, the node at 127.0.0.1,
    for the session."""
    import getpass
    import socket

    for exe in ("munged", "slurmctld", "slurmd", "sbatch"):
        assert shutil.which(exe) or Path(f"/usr/sbin/{exe}").exists(), (
            f"{exe} not found: `make slurm` installs Slurm and munge (Debian packages)"
        )
    root = Path(tempfile.mkdtemp(prefix="nmm-slurm-"))
    for d in ("state", "spool", "munge"):
        (root / d).mkdir()
    (root / "munge").chmod(0o700)
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    host = socket.gethostname().split(".")[0]
    conf = SLURM_CONF.format(host=host, ctld_port=free_port(), d_port=free_port(), root=root,
                             user=getpass.getuser())  # fmt: skip
    (root / "slurm.conf").write_text(conf)
    sbin = lambda exe: shutil.which(exe) or f"/usr/sbin/{exe}"  # noqa: E731
    m = root / "munge"
    subprocess.run([sbin("munged"), "--force", f"--key-file={key}", f"--socket={m}/munge.sock",
                    f"--pid-file={m}/munged.pid", f"--log-file={m}/munged.log",
                    f"--seed-file={m}/seed"], check=True, capture_output=True)  # fmt: skip
    env = dict(os.environ, SLURM_CONF=str(root / "slurm.conf"))
    subprocess.run([sbin("slurmctld"), "-c"], env=env, check=True, capture_output=True)
    subprocess.run([sbin("slurmd"), "-N", host], env=env, check=True, capture_output=True)
    cluster = Slurm(root)
    try:
        deadline = time.monotonic() + 60
        while "idle" not in cluster.run("sinfo", "-h", "-o", "%T"):
            assert time.monotonic() < deadline, (root / "slurmctld.log").read_text()[-2000:]
            time.sleep(0.5)
        yield cluster
    finally:
        subprocess.run(["scancel", "--full", "-u", getpass.getuser()], env=env,
                       capture_output=True)  # fmt: skip
        time.sleep(1)
        for pidfile in ("slurmd.pid", "slurmctld.pid", "munge/munged.pid"):
            with contextlib.suppress(OSError, ValueError):
                os.kill(int((root / pidfile).read_text().strip()), signal.SIGTERM)
        time.sleep(1)
        shutil.rmtree(root, ignore_errors=True)


@dataclass
class RayCluster:
    """A head node and one worker node on loopback (``ray start --block``), each in a process
    group of its own."""

    address: str
    head: subprocess.Popen
    worker: subprocess.Popen

    def _worker_processes(self) -> list:
        """The worker node's processes: its ``ray start``, raylet and the workers the raylet
        started (each in a session of its own, so found as descendants, not by group)."""
        import psutil

        with contextlib.suppress(psutil.Error):
            root = psutil.Process(self.worker.pid)
            return [root, *root.children(recursive=True)]
        return []

    def worker_tasks(self, name: str) -> list[int]:
        """Pids of the worker node's processes running a task ``name`` (Ray titles them)."""
        import psutil

        out = []
        for p in self._worker_processes():
            with contextlib.suppress(psutil.Error):
                if any(f"ray::{name}" in c for c in p.cmdline()):
                    out.append(p.pid)
        return out

    def kill_worker(self) -> None:
        """The worker node lost: its raylet and every process of it killed with -9."""
        import psutil

        for p in self._worker_processes():
            with contextlib.suppress(psutil.Error):
                p.kill()
        self.worker.wait()


def _ray_node(*args: str, log: Path) -> subprocess.Popen:
    ray = str(Path(sys.executable).parent / "ray")
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    return subprocess.Popen([ray, "start", "--block", "--node-ip-address", "127.0.0.1",
                             "--num-cpus", "1", *args], env=env, start_new_session=True,
                            stdout=log.open("a"), stderr=subprocess.STDOUT)  # fmt: skip


@pytest.fixture
def ray_cluster(tmp_path) -> Iterator[RayCluster]:
    """A 2-node Ray cluster on loopback, one CPU each (``ray start --head``, then ``ray start
    --address``), stopped (killed) after the test."""
    port = free_port()
    head = _ray_node("--head", "--port", str(port), "--include-dashboard", "false",
                     "--temp-dir", str(Path(tempfile.gettempdir()) / f"ray-nmm-{port}"),
                     log=tmp_path / "ray-head.log")  # fmt: skip
    worker = None
    try:
        address = f"127.0.0.1:{port}"
        import ray

        deadline = time.monotonic() + 120
        worker = _ray_node("--address", address, log=tmp_path / "ray-worker.log")
        while True:  # both nodes up
            assert head.poll() is None, (tmp_path / "ray-head.log").read_text()[-2000:]
            assert worker.poll() is None, (tmp_path / "ray-worker.log").read_text()[-2000:]
            with contextlib.suppress(Exception):
                ray.init(address=address, logging_level="ERROR", log_to_driver=False)
                try:
                    if len([n for n in ray.nodes() if n["Alive"]]) == 2:
                        break
                finally:
                    ray.shutdown()
            assert time.monotonic() < deadline, "the Ray cluster did not come up in 120 s"
            time.sleep(1)
        yield RayCluster(address, head, worker)
    finally:
        import psutil

        for node in (worker, head):
            if node is None:
                continue
            with contextlib.suppress(psutil.Error):
                for p in [*psutil.Process(node.pid).children(recursive=True)]:
                    with contextlib.suppress(psutil.Error):
                        p.kill()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.pid, signal.SIGKILL)
            node.wait()
        shutil.rmtree(Path(tempfile.gettempdir()) / f"ray-nmm-{port}", ignore_errors=True)
