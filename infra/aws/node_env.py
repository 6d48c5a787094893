#!/usr/bin/env python
"""Write a Ray node's environment file from AWS Secrets Manager (ray_cluster.yaml's setup commands).

    node_env.py jobs   --jobs-secret ARN --region R --out ~/.spot/jobs.env
        every node: the MLflow account jobs log with (MLFLOW_TRACKING_USERNAME / _PASSWORD), the region
    node_env.py server --jobs-secret ARN --admin-secret ARN --db-secret ARN --db-host HOST --bucket B
                       --region R --out ~/.spot/server.env
        head only: what infra/mlflow/head_service.sh needs (database URIs, MLflow admin and jobs accounts)

Nothing secret is passed on the command line or printed; the files are written with mode 600. The head's
instance profile may read all three secrets, the workers' only the jobs secret (see
infra/aws/spot-cluster.cfn.yaml).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path
from urllib.parse import quote


def read_secret(client, secret_id: str) -> dict:
    """A JSON secret of Secrets Manager as a dict."""
    return json.loads(client.get_secret_value(SecretId=secret_id)["SecretString"])


def env_lines(values: dict[str, str]) -> str:
    """Shell-safe KEY=value lines (sourced with `set -a; . file`)."""
    return "".join(f"{key}={shlex.quote(str(value))}\n" for key, value in values.items())


def write_private(path: Path, text: str) -> None:
    """Write text to path, readable by its owner only, replacing the file atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    os.replace(tmp, path)


def postgres_uri(user: str, password: str, host: str, database: str, port: int = 5432) -> str:
    return f"postgresql://{quote(user, safe='')}:{quote(password, safe='')}@{host}:{port}/{database}"


def jobs_values(jobs: dict, region: str) -> dict[str, str]:
    return {
        "MLFLOW_TRACKING_USERNAME": jobs["username"],
        "MLFLOW_TRACKING_PASSWORD": jobs["password"],
        "AWS_DEFAULT_REGION": region,
    }


def server_values(
    jobs: dict, admin: dict, db: dict, db_host: str, bucket: str, region: str
) -> dict[str, str]:
    return {
        "MLFLOW_BACKEND_STORE_URI": postgres_uri(db["username"], db["password"], db_host, "mlflow"),
        "MLFLOW_AUTH_DATABASE_URI": postgres_uri(db["username"], db["password"], db_host, "mlflow_auth"),
        "MLFLOW_ARTIFACTS_DESTINATION": f"s3://{bucket}/spot/mlflow",
        "MLFLOW_AUTH_ADMIN_USERNAME": admin["username"],
        "MLFLOW_AUTH_ADMIN_PASSWORD": admin["password"],
        "MLFLOW_JOBS_USERNAME": jobs["username"],
        "MLFLOW_JOBS_PASSWORD": jobs["password"],
        "AWS_DEFAULT_REGION": region,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("kind", choices=["jobs", "server"])
    p.add_argument("--region", required=True)
    p.add_argument("--jobs-secret", required=True)
    p.add_argument("--admin-secret")
    p.add_argument("--db-secret")
    p.add_argument("--db-host")
    p.add_argument("--bucket")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    import boto3

    client = boto3.client("secretsmanager", region_name=args.region)
    jobs = read_secret(client, args.jobs_secret)
    if args.kind == "jobs":
        values = jobs_values(jobs, args.region)
    else:
        missing = [f for f in ("admin_secret", "db_secret", "db_host", "bucket") if not getattr(args, f)]
        if missing:
            p.error("server needs " + ", ".join("--" + m.replace("_", "-") for m in missing))
        db = read_secret(client, args.db_secret)
        values = server_values(jobs, read_secret(client, args.admin_secret), db, args.db_host, args.bucket,
                               args.region)
    write_private(args.out.expanduser(), env_lines(values))
    print(f"node_env.py: wrote {args.out} ({', '.join(values)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
