"""A throwaway PostgreSQL server for the tests of the feedback store: initdb in a temporary folder, a free
port on loopback, trust authentication, stopped and deleted at the end.

Uses Debian's postgresql package (`make test` installs it with apt when it can). As root it runs the
server as the `postgres` user, since PostgreSQL refuses to run as root. RETINALENS_TEST_POSTGRES_URL
(a SQLAlchemy URL of a server that may create databases) is used instead when it is set.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

DRIVER = "postgresql+psycopg"


def _binaries() -> Path | None:
    found = shutil.which("pg_ctl") or shutil.which("initdb")
    if found:
        return Path(found).parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    return versions[-1].parent if versions else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def postgres_server() -> Iterator[str]:
    """Yield the URL of a PostgreSQL server's maintenance database, or skip the test saying why."""
    if os.environ.get("RETINALENS_TEST_POSTGRES_URL"):
        yield os.environ["RETINALENS_TEST_POSTGRES_URL"]
        return
    pytest.importorskip("psycopg", reason="the psycopg driver is not installed (extra 'postgres')")
    bin_dir = _binaries()
    if bin_dir is None:
        pytest.skip("PostgreSQL is not installed (Debian package postgresql; make test installs it when root)")
    as_user: list[str] = []
    root = Path(tempfile.mkdtemp(prefix="retinalens-pg-"))
    if os.geteuid() == 0:  # the server will not run as root
        if shutil.which("runuser") is None:
            pytest.skip("running as root without runuser: cannot start PostgreSQL as another user")
        as_user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(root, "postgres")
    data, port = root / "data", _free_port()

    def run(*cmd: str) -> None:
        subprocess.run([*as_user, *cmd], check=True, capture_output=True, timeout=120)

    try:
        run(str(bin_dir / "initdb"), "-D", str(data), "-U", "retinalens", "--auth=trust", "-E", "UTF8")
        run(str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(root / "server.log"), "-w",
            "-o", f"-k {root} -p {port} -h 127.0.0.1", "start")
        yield f"{DRIVER}://retinalens@127.0.0.1:{port}/postgres"
    finally:
        if (data / "postmaster.pid").exists():
            subprocess.run([*as_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                           check=False, capture_output=True, timeout=120)
        shutil.rmtree(root, ignore_errors=True)


def fresh_database(server_url: str) -> str:
    """A new, empty database on the server; returns its URL."""
    import sqlalchemy as sa

    name = f"feedback_{uuid.uuid4().hex[:12]}"
    engine = sa.create_engine(server_url, isolation_level="AUTOCOMMIT")  # CREATE DATABASE: no transaction
    try:
        with engine.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    finally:
        engine.dispose()
    return str(sa.engine.make_url(server_url).set(database=name).render_as_string(hide_password=False))
