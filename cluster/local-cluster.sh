#!/usr/bin/env bash
# A multi-node Ray cluster on this machine: a head and two worker nodes, each its own
# `ray start --block` process group on loopback, with distinct logical resources and ports,
# the Jobs API on the head, token authentication on.
#
#   cluster/local-cluster.sh start [STATE_DIR]   # prints the env to use it (also in STATE_DIR/env)
#   cluster/local-cluster.sh stop [STATE_DIR]    # stops every node by its process group id
#   cluster/local-cluster.sh kill-node N [STATE_DIR]  # SIGKILL worker node N (fault tests)
#   cluster/local-cluster.sh add-node N [STATE_DIR]   # start worker node N (again)
#
# Ports: GCS $GCS_PORT (6390), dashboard + Jobs API $DASHBOARD_PORT (8265), Ray metrics
# $METRICS_PORT (8080) on the head and the next ones on the workers. Override with those
# variables. STATE_DIR (default .cache/local-cluster) holds pids, logs, the auth token and each
# node's Ray temp dir (ray/ the head's, w<N>.* the workers'); keep it short, Ray's socket paths
# live under it.
set -euo pipefail

cmd="${1:-}"
shift || true
case "$cmd" in kill-node|add-node) node="${1:?$cmd needs a worker number}"; shift ;; esac
root="$(cd "$(dirname "$0")/.." && pwd)"
state="${1:-$root/.cache/local-cluster}"
ray_bin="${RAY_BIN:-$(command -v ray || echo "$root/.venv/bin/ray")}"
python_bin="$(dirname "$ray_bin")/python"
[ -x "$python_bin" ] || python_bin=python3
# job entrypoints say `python ...`: make that the Python environment Ray itself runs in
export PATH="$(dirname "$ray_bin"):$PATH"

GCS_PORT="${GCS_PORT:-6390}"
DASHBOARD_PORT="${DASHBOARD_PORT:-8265}"
METRICS_PORT="${METRICS_PORT:-8080}"
HEAD_CPUS="${HEAD_CPUS:-1}"
WORKER_CPUS="${WORKER_CPUS:-1}"
WORKERS="${WORKERS:-2}"
PORT_BASE="${PORT_BASE:-21000}"  # per-node agent and worker port ranges start here

node_ports() {  # node index -> distinct agent ports and worker port range
  local i=$1 base=$((PORT_BASE + $1 * 1000))
  echo "--node-manager-port=$((base + 1)) --object-manager-port=$((base + 2))" \
       "--dashboard-agent-listen-port=$((base + 3)) --dashboard-agent-grpc-port=$((base + 4))" \
       "--runtime-env-agent-port=$((base + 5))" \
       "--min-worker-port=$((base + 100)) --max-worker-port=$((base + 999))" \
       "--metrics-export-port=$((METRICS_PORT + i))"
}

start_node() {  # name, temp dir, args...: a process group of its own, so it stops by one pid
  local name=$1 temp=$2
  shift 2
  setsid "$ray_bin" start --block --node-ip-address=127.0.0.1 --temp-dir="$temp" "$@" \
    >"$state/$name.log" 2>&1 < /dev/null &
  echo $! > "$state/$name.pid"
}

wait_for_nodes() {
  local want=$1 deadline=$((SECONDS + 120))
  while [ $SECONDS -lt $deadline ]; do
    local alive
    alive=$(timeout 20 "$python_bin" - "$GCS_PORT" <<'PY' 2>/dev/null || echo 0
import os, sys
os.environ["RAY_ENABLE_AUTO_CONNECT"] = "0"
import ray
ray.init(address=f"127.0.0.1:{sys.argv[1]}", logging_level="ERROR", log_to_driver=False)
print(sum(1 for n in ray.nodes() if n["Alive"]))
PY
)
    [ "${alive:-0}" -ge "$want" ] && return 0
    sleep 1
  done
  echo "cluster did not reach $want nodes; logs in $state" >&2
  return 1
}

stop_group() {  # stop_group SIGNAL PIDFILE...: signal every node at once, then wait for all
  local signal=$1 pidfile pid
  shift
  local pids=()
  for pidfile in "$@"; do
    [ -f "$pidfile" ] || continue
    pid=$(cat "$pidfile")
    kill "-$signal" -- "-$pid" 2>/dev/null || true
    pids+=("$pid")
  done
  for _ in $(seq 1 50); do
    local alive=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [ "$alive" = 0 ] && break
    sleep 0.2
  done
  for pid in "${pids[@]}"; do kill -KILL -- "-$pid" 2>/dev/null || true; done
  rm -f "$@"
}

start_worker() {
  # Every node gets a temp dir of its own, as every machine of a real cluster has its own disk.
  # Nodes sharing one would share runtime_resources/, where each node's runtime-env agent
  # unpacks a job's working_dir afresh (deleting what is there) the first time it needs it:
  # a node added mid-run would pull the working directory from under a running driver. A new
  # one per start: a killed node's sockets and files stay behind in its old one.
  local temp
  temp=$(mktemp -d "$state/w$1.XXX")
  # shellcheck disable=SC2046
  start_node "worker$1" "$temp" --address="127.0.0.1:$GCS_PORT" --num-cpus="$WORKER_CPUS" \
    --resources="{\"worker_node_$1\": 1}" $(node_ports "$1")
}

alive_nodes() {
  local count=0
  for pidfile in "$state"/*.pid; do
    [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null && count=$((count + 1))
  done
  echo $count
}

case "$cmd" in
  start)
    mkdir -p "$state"
    if [ -f "$state/head.pid" ] && kill -0 "$(cat "$state/head.pid")" 2>/dev/null; then
      echo "already running (head pid $(cat "$state/head.pid")); stop it first" >&2
      exit 1
    fi
    [ -s "$state/auth_token" ] || "$python_bin" -c "import secrets; print(secrets.token_hex(32))" \
      > "$state/auth_token"
    chmod 600 "$state/auth_token"
    export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$state/auth_token" RAY_ENABLE_AUTO_CONNECT=0
    # shellcheck disable=SC2046
    start_node head "$state/ray" --head --port="$GCS_PORT" --dashboard-host=127.0.0.1 \
      --dashboard-port="$DASHBOARD_PORT" --include-dashboard=true --num-cpus="$HEAD_CPUS" \
      --resources='{"head_node": 1}' $(node_ports 0)
    wait_for_nodes 1
    for i in $(seq 1 "$WORKERS"); do
      start_worker "$i"  # one at a time: each joins a running head
      wait_for_nodes $((i + 1))
    done
    cat > "$state/env" <<EOF
export RAY_ADDRESS=http://127.0.0.1:$DASHBOARD_PORT
export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN_PATH=$state/auth_token
export RAY_ENABLE_AUTO_CONNECT=0
EOF
    echo "local cluster up: head + $WORKERS workers; Jobs API and dashboard on" \
         "http://127.0.0.1:$DASHBOARD_PORT, GCS 127.0.0.1:$GCS_PORT"
    echo "use it with: source $state/env"
    ;;
  stop)
    stop_group TERM "$state"/worker*.pid "$state/head.pid"
    echo "local cluster stopped"
    ;;
  kill-node)
    stop_group KILL "$state/worker$node.pid"
    echo "worker node $node killed"
    ;;
  add-node)
    export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$state/auth_token" RAY_ENABLE_AUTO_CONNECT=0
    want=$(($(alive_nodes) + 1))
    start_worker "$node"
    wait_for_nodes "$want"
    echo "worker node $node started"
    ;;
  *)
    echo "usage: $0 start|stop [STATE_DIR] | kill-node|add-node N [STATE_DIR]" >&2
    exit 2
    ;;
esac
