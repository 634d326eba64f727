#!/usr/bin/env bash
# The MLflow UI as a user sees it (`make ui-check`).
#
#   bash checks/ui_check.sh [PROJECT_DIR]     (default: the current folder)
#
# Starts `mlflow ui` on PROJECT_DIR/mlflow.db at a free local port, waits for /health, lets
# checks/ui_check.py photograph the newest pipeline run (run list, parent overview, a stage's
# metric charts, a plot in the artifact browser) into PROJECT_DIR/ui-screenshots/, and stops the
# server whatever happens. Environment: UI_CHECK_OUT (screenshot folder), UI_CHECK_TIMEOUT (seconds
# per page, default 90), UI_CHECK_START_TIMEOUT (seconds for the server to come up, default 180),
# CHROMIUM (browser binary), MLFLOW (mlflow executable).
set -euo pipefail

fail() { echo "ui-check: $*" >&2; exit 1; }

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
[[ -d ${1:-.} ]] || fail "project folder '${1:-.}' does not exist"
project="$(cd "${1:-.}" && pwd)"
db="$project/mlflow.db"
[[ -f $db ]] || fail "no MLflow store at $db: run \`make run\` first"

mlflow_bin="${MLFLOW:-}"
if [[ -z $mlflow_bin ]]; then
    if [[ -x $repo/.venv/bin/mlflow ]]; then mlflow_bin="$repo/.venv/bin/mlflow"
    else mlflow_bin="$(command -v mlflow || true)"; fi
fi
[[ -n $mlflow_bin && -x $mlflow_bin ]] || fail "no mlflow executable: run \`make venv\` (or set MLFLOW=/path/to/mlflow)"
python_bin="$(dirname "$mlflow_bin")/python"
[[ -x $python_bin ]] || python_bin="$(command -v python3)" || fail "no python3 found"
command -v curl >/dev/null || fail "curl is needed to wait for the server (apt-get install curl)"

port="$("$python_bin" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
url="http://127.0.0.1:$port"
log="$(mktemp -t ui-check-mlflow.XXXXXX.log)"

server_pid=""
check_pid=""
stop_server() {
    if [[ -n $server_pid ]]; then
        kill -TERM -- "-$server_pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$server_pid" 2>/dev/null || break; sleep 0.2; done
        kill -KILL -- "-$server_pid" 2>/dev/null || true  # whatever of its group is still there
        wait "$server_pid" 2>/dev/null || true
    fi
    rm -f "$log"
}
stop_check() {
    if [[ -n $check_pid ]]; then kill -TERM "$check_pid" 2>/dev/null || true; wait "$check_pid" 2>/dev/null || true; fi
}
trap stop_server EXIT
trap 'stop_check; echo "ui-check: interrupted" >&2; exit 130' INT TERM

# The server runs in its own session (and process group, numbered by its pid), so that stopping
# the group also stops the uvicorn worker it starts.
(
    cd "$project"
    exec setsid env MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false MLFLOW_DISABLE_TELEMETRY=true \
        "$mlflow_bin" ui --backend-store-uri "sqlite:///$db" --host 127.0.0.1 --port "$port" --workers 1
) >"$log" 2>&1 &
server_pid=$!

echo "ui-check: starting the MLflow UI on $db at $url"
start_timeout="${UI_CHECK_START_TIMEOUT:-180}"
started=$SECONDS
until curl -fsS -o /dev/null --max-time 5 "$url/health" 2>/dev/null; do
    if ! kill -0 "$server_pid" 2>/dev/null; then
        echo "ui-check: the MLflow UI exited before answering; its log:" >&2
        tail -n 30 "$log" >&2
        exit 1
    fi
    if (( SECONDS - started > start_timeout )); then
        echo "ui-check: the MLflow UI did not answer $url/health within ${start_timeout}s; its log:" >&2
        tail -n 30 "$log" >&2
        exit 1
    fi
    sleep 1
done
echo "ui-check: server up after $((SECONDS - started))s"

# In the background and waited for, so that an interrupt reaches the trap (and the browser) at once.
"$python_bin" "$here/ui_check.py" --url "$url" --out "${UI_CHECK_OUT:-$project/ui-screenshots}" &
check_pid=$!
wait "$check_pid"
