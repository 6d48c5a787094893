#!/usr/bin/env bash
# Start the MLflow tracking server for a SPOT cluster: PostgreSQL backend store, artifacts proxied to an
# S3-compatible bucket, basic authentication on (`--app-name basic-auth`).
#
# Used on the Ray head of ray_cluster.yaml, by the Kubernetes manifest infra/mlflow/mlflow.yaml, and (with
# SQLite and a local directory standing in for PostgreSQL and S3) by the local rehearsal
# infra/local_multinode.py. All configuration comes from the environment; nothing secret is in this file.
#
# Required:
#   MLFLOW_BACKEND_STORE_URI      postgresql://mlflow:<password>@<db-host>:5432/mlflow
#   MLFLOW_ARTIFACTS_DESTINATION  s3://<bucket>/mlflow   (+ MLFLOW_S3_ENDPOINT_URL for MinIO/other S3)
#   MLFLOW_AUTH_DATABASE_URI      postgresql://mlflow:<password>@<db-host>:5432/mlflow_auth
#                                 (a separate database: both stores keep their own alembic_version table)
#   MLFLOW_AUTH_ADMIN_PASSWORD    password of the admin user, created on the first start only
# Optional:
#   MLFLOW_AUTH_ADMIN_USERNAME    admin                   MLFLOW_HOST     127.0.0.1 (0.0.0.0 on a Ray head)
#   MLFLOW_PORT                   5000                    MLFLOW_WORKERS  4
#   MLFLOW_DEFAULT_PERMISSION     READ (what any logged-in user may do on others' experiments;
#                                 NO_PERMISSIONS to keep users apart)
#   MLFLOW_SERVER_ALLOWED_HOSTS   Host headers accepted (MLflow's own variable; default: localhost and
#                                 private IPs -- add the service name on Kubernetes)
#   MLFLOW_FLASK_SERVER_SECRET_KEY  CSRF secret of the auth app (must be the same on every replica); when
#                                 unset, a random one is generated once and kept in the runtime dir
#   SPOT_MLFLOW_RUNTIME_DIR       where the generated auth config goes (default ~/.spot-mlflow, mode 700)
#   SPOT_MLFLOW_PIDFILE           write the server's PID here (for `kill $(cat ...)`)
#   MLFLOW_SERVER_ENABLE_JOB_EXECUTION  false: MLflow's job runner (a huey consumer per job queue, 8 processes
#                                 beside the server) runs GenAI jobs (judges, trace roll-ups) that SPOT never
#                                 submits; true brings it back
#
# Clients authenticate with MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD in their environment.
set -euo pipefail

die() { echo "start_server.sh: $*" >&2; exit 2; }
[[ -n "${MLFLOW_BACKEND_STORE_URI:-}" ]] || die "set MLFLOW_BACKEND_STORE_URI (e.g. postgresql://mlflow:...@db:5432/mlflow)"
[[ -n "${MLFLOW_ARTIFACTS_DESTINATION:-}" ]] || die "set MLFLOW_ARTIFACTS_DESTINATION (e.g. s3://bucket/mlflow)"
[[ -n "${MLFLOW_AUTH_DATABASE_URI:-}" ]] || die "set MLFLOW_AUTH_DATABASE_URI (a database separate from the backend store)"
[[ -n "${MLFLOW_AUTH_ADMIN_PASSWORD:-}" ]] || die "set MLFLOW_AUTH_ADMIN_PASSWORD (admin user, created on first start)"
[[ "$MLFLOW_AUTH_DATABASE_URI" != "$MLFLOW_BACKEND_STORE_URI" ]] \
  || die "MLFLOW_AUTH_DATABASE_URI must name a different database than MLFLOW_BACKEND_STORE_URI"
command -v mlflow >/dev/null || die "mlflow is not on PATH"

export MLFLOW_AUTH_ADMIN_USERNAME="${MLFLOW_AUTH_ADMIN_USERNAME:-admin}"
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"
runtime_dir="${SPOT_MLFLOW_RUNTIME_DIR:-$HOME/.spot-mlflow}"
umask 077
mkdir -p "$runtime_dir"
chmod 700 "$runtime_dir"

# MLflow reads the auth store's location only from an ini file (MLFLOW_AUTH_CONFIG_PATH). The file holds the
# auth database URI (with its password), hence mode 600 in a mode-700 directory. The admin password stays
# in the environment (MLFLOW_AUTH_ADMIN_PASSWORD, read by MLflow itself).
# MLflow's reader is a configparser with interpolation: every '%' of a value (a percent-encoded password
# in the URI has some) is written as '%%', which it reads back as '%'. A value cannot span lines.
ini_value() {
  [[ "$2" != *$'\n'* && "$2" != *$'\r'* ]] || die "$1 must not contain a line break"
  printf '%s' "${2//\%/%%}"
}
permission_ini="$(ini_value MLFLOW_DEFAULT_PERMISSION "${MLFLOW_DEFAULT_PERMISSION:-READ}")"
database_uri_ini="$(ini_value MLFLOW_AUTH_DATABASE_URI "$MLFLOW_AUTH_DATABASE_URI")"
admin_username_ini="$(ini_value MLFLOW_AUTH_ADMIN_USERNAME "$MLFLOW_AUTH_ADMIN_USERNAME")"
auth_ini="$runtime_dir/basic_auth.ini"
cat >"$auth_ini" <<INI
[mlflow]
default_permission = ${permission_ini}
database_uri = ${database_uri_ini}
admin_username = ${admin_username_ini}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
INI
export MLFLOW_AUTH_CONFIG_PATH="$auth_ini"

if [[ -z "${MLFLOW_FLASK_SERVER_SECRET_KEY:-}" ]]; then
  key_file="$runtime_dir/flask_secret_key"
  [[ -s "$key_file" ]] || od -An -tx1 -N32 /dev/urandom | tr -d ' \n' >"$key_file"
  MLFLOW_FLASK_SERVER_SECRET_KEY="$(cat "$key_file")"
  export MLFLOW_FLASK_SERVER_SECRET_KEY
fi

if [[ -n "${SPOT_MLFLOW_PIDFILE:-}" ]]; then
  echo $$ >"$SPOT_MLFLOW_PIDFILE"  # exec below keeps this PID
fi

# The store URIs (with the database password) stay in the environment, where `mlflow server` reads them
# (MLFLOW_BACKEND_STORE_URI, MLFLOW_ARTIFACTS_DESTINATION): a command line is visible to every user in `ps`.
export MLFLOW_BACKEND_STORE_URI MLFLOW_ARTIFACTS_DESTINATION
exec mlflow server \
  --app-name basic-auth \
  --serve-artifacts \
  --host "${MLFLOW_HOST:-127.0.0.1}" \
  --port "${MLFLOW_PORT:-5000}" \
  --workers "${MLFLOW_WORKERS:-4}"
