"""Real servers on loopback for the scale-out tests: PostgreSQL and an S3-compatible store.

PostgreSQL is Debian's (``make test`` installs the ``postgresql`` package when it is missing);
``initdb`` and ``pg_ctl`` refuse to run as root, so as root they run as the ``postgres`` user
(``runuser``) in a directory of their own; the server listens on 127.0.0.1 at a free port,
with password authentication for TCP. The S3 is moto's server (``moto[server]`` from PyPI),
in memory, on 127.0.0.1 at a free port. Both live for the test session.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
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
