#!/usr/bin/env python
"""Create the MLflow user that jobs log with, or set its password if it exists (as the admin).

    MLFLOW_AUTH_ADMIN_USERNAME=admin MLFLOW_AUTH_ADMIN_PASSWORD=... \
    MLFLOW_JOBS_USERNAME=spot-jobs MLFLOW_JOBS_PASSWORD=... python infra/mlflow/ensure_user.py http://127.0.0.1:5000
"""

from __future__ import annotations

import base64
import json
import os
import sys
import urllib.error
import urllib.request

TIMEOUT_S = 60  # per request: a busy head answers the first password hashing slowly


def call(url: str, method: str, payload: dict, admin: tuple[str, str]) -> tuple[int, str]:
    """One authenticated JSON request; (HTTP status, body)."""
    token = base64.b64encode(f"{admin[0]}:{admin[1]}".encode()).decode()
    request = urllib.request.Request(
        url,
        data=json.dumps(payload).encode(),
        method=method,
        headers={"Authorization": f"Basic {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(errors="replace")


def ensure_user(base_url: str, username: str, password: str, admin: tuple[str, str]) -> str:
    """'created' or 'updated'; raises RuntimeError otherwise."""
    api = base_url.rstrip("/") + "/api/2.0/mlflow/users"
    status, body = call(f"{api}/create", "POST", {"username": username, "password": password}, admin)
    if status == 200:
        return "created"
    status2, body2 = call(
        f"{api}/update-password", "PATCH", {"username": username, "password": password}, admin
    )
    if status2 == 200:
        return "updated"
    raise RuntimeError(f"create: HTTP {status} {body[:200]}; update-password: HTTP {status2} {body2[:200]}")


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    env = os.environ
    admin = (env.get("MLFLOW_AUTH_ADMIN_USERNAME", "admin"), env["MLFLOW_AUTH_ADMIN_PASSWORD"])
    what = ensure_user(argv[1], env["MLFLOW_JOBS_USERNAME"], env["MLFLOW_JOBS_PASSWORD"], admin)
    print(f"ensure_user: {env['MLFLOW_JOBS_USERNAME']} {what}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
