#!/usr/bin/env bash
# The MLflow server as a service on a Ray head (ray_cluster.yaml's head_start_ray_commands).
#
#   head_service.sh start    stop a running one; upgrade the database schema; start start_server.sh under a
#                            restart loop; wait for /health; create or update the jobs user. Exits non-zero,
#                            with the reason and the log's tail, if any step fails, so `ray up` fails loudly.
#   head_service.sh stop     stop the server and its restart loop
#   head_service.sh status   exit 0 when /health answers
#
# Configuration: the environment of start_server.sh (MLFLOW_BACKEND_STORE_URI, ...), plus
#   MLFLOW_JOBS_USERNAME / MLFLOW_JOBS_PASSWORD   the account jobs log with (created here as admin)
#   SPOT_STATE_DIR                                pid file and log (default ~/.spot)
#   SPOT_MLFLOW_START_TIMEOUT_S                   how long to wait for /health (default 120)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
state="${SPOT_STATE_DIR:-$HOME/.spot}"
pidfile="$state/mlflow-supervisor.pid"
log="$state/mlflow.log"
port="${MLFLOW_PORT:-5000}"
health="http://127.0.0.1:${port}/health"

die() {
  echo "head_service.sh: $*" >&2
  if [[ -s "$log" ]]; then
    echo "--- last lines of $log:" >&2
    tail -n 30 "$log" >&2
  fi
  exit 1
}

healthy() {
  python - "$health" <<'PY' >/dev/null 2>&1
import sys, urllib.request
urllib.request.urlopen(sys.argv[1], timeout=3).read()
PY
}

stop() {
  [[ -s "$pidfile" ]] || return 0
  local pid
  pid="$(cat "$pidfile")"
  # The restart loop leads its own process group: stop the loop and the server together.
  kill -TERM -- "-$pid" 2>/dev/null || true
  for _ in $(seq 1 20); do
    kill -0 -- "-$pid" 2>/dev/null || break
    sleep 0.5
  done
  kill -KILL -- "-$pid" 2>/dev/null || true
  rm -f "$pidfile"
}

start() {
  [[ -n "${MLFLOW_BACKEND_STORE_URI:-}" ]] || die "MLFLOW_BACKEND_STORE_URI is not set (is ~/.spot/server.env sourced?)"
  command -v mlflow >/dev/null || die "mlflow is not on PATH"
  mkdir -p "$state"
  chmod 700 "$state"
  stop
  : >"$log"
  chmod 600 "$log"

  # Creates the tables of a new database and migrates an existing one after an MLflow upgrade; a wrong
  # URI, password or an unreachable host fails here, before anything runs in the background.
  echo "head_service.sh: mlflow db upgrade (backend store)"
  mlflow db upgrade "$MLFLOW_BACKEND_STORE_URI" >>"$log" 2>&1 || die "mlflow db upgrade failed"
  # MLflow's user store lives in its own database, which RDS does not create: create it when missing
  # (the same script is the init container of the KubeRay MLflow pod, infra/mlflow/mlflow.yaml).
  python "$here/ensure_database.py" >>"$log" 2>&1 || die "could not create the auth database (see $log)"

  # The restart loop: a crashed server is restarted after 5 s; 5 crashes within 30 s of their start in a
  # row end the loop (and the service, which `status` then reports).
  setsid bash -c '
    trap "kill -TERM \$child 2>/dev/null; wait \$child; exit 0" TERM
    quick=0
    while :; do
      started=$(date +%s)
      bash "$1" & child=$!
      wait $child && code=0 || code=$?
      if (( $(date +%s) - started < 30 )); then quick=$((quick + 1)); else quick=0; fi
      echo "$(date -Is) head_service: mlflow server exited with code $code"
      if (( quick >= 5 )); then echo "$(date -Is) head_service: giving up"; exit 1; fi
      sleep 5
    done' head_service "$here/start_server.sh" >>"$log" 2>&1 </dev/null &
  echo $! >"$pidfile"

  local waited=0 limit="${SPOT_MLFLOW_START_TIMEOUT_S:-120}"
  until healthy; do
    kill -0 "$(cat "$pidfile")" 2>/dev/null || die "the MLflow server exited during start-up"
    # A server that starts and crashes again is not up, whatever /health said once: look at the log.
    if grep -q "head_service: mlflow server exited" "$log"; then
      stop
      die "the MLflow server exited during start-up"
    fi
    (( waited >= limit )) && { stop; die "no answer from $health after ${limit}s"; }
    sleep 1
    waited=$((waited + 1))
  done
  echo "head_service.sh: MLflow is up at port $port (log: $log)"

  if [[ -n "${MLFLOW_JOBS_USERNAME:-}" ]]; then
    [[ -n "${MLFLOW_JOBS_PASSWORD:-}" ]] || die "MLFLOW_JOBS_USERNAME is set but MLFLOW_JOBS_PASSWORD is not"
    python "$here/ensure_user.py" "http://127.0.0.1:${port}" >>"$log" 2>&1 \
      || die "could not create or update the MLflow user $MLFLOW_JOBS_USERNAME"
    echo "head_service.sh: MLflow user $MLFLOW_JOBS_USERNAME is ready"
  fi
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) healthy ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
