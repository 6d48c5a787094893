#!/usr/bin/env python
"""Create the PostgreSQL database named by a SQLAlchemy URI when it does not exist yet.

MLflow keeps its users in their own database (MLFLOW_AUTH_DATABASE_URI, `mlflow_auth`), which neither RDS
nor a managed PostgreSQL creates (they create the backend's). The `ray up` head (head_service.sh) and the
KubeRay MLflow pod (init container of mlflow.yaml) both run this before the server starts:

    MLFLOW_AUTH_DATABASE_URI=postgresql://mlflow:<pw>@db/mlflow_auth python infra/mlflow/ensure_database.py

The URI is read from the environment (never argv, which other users of the host can see). Exit 0 when the
database exists (or the URI is not PostgreSQL: SQLite creates its own file), 1 when the server refuses,
2 when the variable is missing.
"""

from __future__ import annotations

import argparse
import os
import sys


def ensure_database(uri: str) -> bool:
    """Create the database of `uri` (connecting to `postgres` as its user) if missing; True if created."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    url = make_url(uri)
    engine = create_engine(url.set(database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            query = text("SELECT 1 FROM pg_database WHERE datname = :name")
            if conn.execute(query, {"name": url.database}).first() is not None:
                return False
            name = engine.dialect.identifier_preparer.quote(url.database)
            conn.execute(text(f"CREATE DATABASE {name}"))
            return True
    finally:
        engine.dispose()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--from-env", default="MLFLOW_AUTH_DATABASE_URI", metavar="VAR",
                   help="the environment variable holding the URI")
    args = p.parse_args(argv)
    uri = os.environ.get(args.from_env, "")
    if not uri:
        print(f"ensure_database.py: {args.from_env} is not set", file=sys.stderr)
        return 2
    from sqlalchemy.engine import make_url

    url = make_url(uri)
    shown = url.render_as_string(hide_password=True)
    if url.get_backend_name() != "postgresql":
        print(f"ensure_database.py: {shown} is not PostgreSQL; nothing to create")
        return 0
    try:
        created = ensure_database(uri)
    except Exception as err:  # the driver's error, one line, without the password
        detail = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"ensure_database.py: cannot create {shown}: {detail}", file=sys.stderr)
        return 1
    print(f"ensure_database.py: {shown} {'created' if created else 'exists'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
