#!/usr/bin/env bash
# Stops the Ray head that cluster/local-head.sh started in DIR, by process id, and removes DIR.
# It ends only that head's processes (never `ray stop`, which ends every Ray on the machine).
#
#   cluster/local-head-stop.sh DIR
set -euo pipefail

state=${1:?usage: cluster/local-head-stop.sh DIR (the folder local-head.sh printed)}
[ -f "$state/head.pid" ] || { echo "local-head-stop.sh: $state holds no head.pid; give the folder local-head.sh printed" >&2; exit 1; }
pid=$(cat "$state/head.pid")

# The head's own processes carry DIR in their command lines; so does nothing else.
ours() { pgrep -f -- "--temp-dir[= ]$state( |\$)|$state/session_" || true; }

# Wait up to $1 seconds for the head's processes to exit.
gone_within() {
  for _ in $(seq "$1"); do
    [ -z "$(ours)" ] && return 0
    sleep 1
  done
  [ -z "$(ours)" ]
}

if kill -0 "$pid" 2>/dev/null && tr '\0' ' ' < "/proc/$pid/cmdline" | grep -q -- "$state"; then
  kill -TERM "$pid"  # `ray start --block` stops the processes it started, then exits
fi
# Its graceful shutdown can wait on a draining raylet for half a minute; the head's own
# processes get SIGTERM directly after 10 s, and SIGKILL after 10 more.
if ! gone_within 10; then
  kill -TERM $(ours) 2>/dev/null || true
  if ! gone_within 10; then
    echo "local-head-stop.sh: killing processes that outlived the head: $(echo $(ours))" >&2
    kill -KILL $(ours) 2>/dev/null || true
  fi
fi
rm -rf "$state"
echo "stopped the Ray head of $state (process $pid)"
