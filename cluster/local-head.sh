#!/usr/bin/env bash
# A single-node Ray head for `dldr submit`, on this machine only: every port on 127.0.0.1,
# token authentication on, and Ray's files in a private temporary folder, so it never touches
# another Ray instance on the machine. Run it where dldr is installed (the job runs `python`
# from this PATH). Stop it with cluster/local-head-stop.sh, which ends only what this started.
#
#   cluster/local-head.sh [--port 6379] [--dashboard-port 8265] [--client-port 10001]
#                         [--agent-port 52365] [--num-cpus N] [--num-gpus N]
#
# The token: RAY_AUTH_TOKEN if set, else the file RAY_AUTH_TOKEN_PATH names, else
# ~/.ray/auth_token; a missing file is created with a new random token.
set -euo pipefail

port=6379 dashboard_port=8265 client_port=10001 agent_port=52365 resources=()
while [ $# -gt 0 ]; do
  case "$1" in
    --port) port=$2 ;;
    --dashboard-port) dashboard_port=$2 ;;
    --client-port) client_port=$2 ;;
    --agent-port) agent_port=$2 ;;
    --num-cpus|--num-gpus) resources+=("$1" "$2") ;;
    *) echo "local-head.sh: unknown option $1; see the comment at the top of $0" >&2; exit 2 ;;
  esac
  shift 2
done
command -v ray >/dev/null || { echo "local-head.sh: no \`ray\` on PATH; activate the environment dldr is installed in" >&2; exit 1; }

token_source="RAY_AUTH_TOKEN"
if [ -z "${RAY_AUTH_TOKEN:-}" ]; then
  token_source="${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}"
  if [ ! -s "$token_source" ]; then
    mkdir -p "$(dirname "$token_source")"
    (umask 077 && python3 -c 'import secrets; print(secrets.token_hex(32), end="")' > "$token_source")
    echo "wrote a new token to $token_source"
  fi
fi

state=$(mktemp -d /tmp/dldr-head-XXXXXX)  # short: Ray puts Unix sockets inside
export RAY_AUTH_MODE=token RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
# Jobs' drivers inherit this: Ray Train polls the workers 4 times a second instead of every 2 s,
# which is what a per-epoch report waits for; short epochs on a workstation then wait less.
export RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=${RAY_TRAIN_HEALTH_CHECK_INTERVAL_S:-0.25}
# --block keeps this process as the head's parent: SIGTERM to it stops every process it started.
nohup ray start --head --block --disable-usage-stats --temp-dir "$state" \
  --node-ip-address 127.0.0.1 --port "$port" --ray-client-server-port "$client_port" \
  --dashboard-host 127.0.0.1 --dashboard-port "$dashboard_port" --dashboard-agent-listen-port "$agent_port" \
  "${resources[@]}" > "$state/head.log" 2>&1 < /dev/null &
echo $! > "$state/head.pid"

address="http://127.0.0.1:$dashboard_port"
# Up once the dashboard answers at all: without a token it answers 401.
if ! python3 - "$address" "$state/head.pid" <<'PY'; then
import os, sys, time, urllib.error, urllib.request
for _ in range(120):
    os.kill(int(open(sys.argv[2]).read()), 0)  # the head exited: stop waiting
    try:
        urllib.request.urlopen(sys.argv[1] + "/api/version", timeout=2)
        sys.exit(0)
    except urllib.error.HTTPError:
        sys.exit(0)
    except OSError:
        time.sleep(1)
sys.exit(1)
PY
  echo "local-head.sh: the Ray head did not come up; the end of its log:" >&2
  tail -n 20 "$state/head.log" >&2
  kill "$(cat "$state/head.pid")" 2>/dev/null || true
  exit 1
fi

cat <<MSG
Ray head on 127.0.0.1, process $(cat "$state/head.pid"), files in $state
  jobs (dashboard)   export RAY_ADDRESS=$address       dldr submit jobs/digits.yaml --wait
  cluster (GCS)      127.0.0.1:$port                   dldr fit --address 127.0.0.1:$port
  token              $token_source
  stop               cluster/local-head-stop.sh $state
MSG
