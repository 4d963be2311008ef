#!/usr/bin/env bash
# Stops the Ray head that cluster/local-head.sh started in DIR, by process id, and removes DIR.
# It ends only that head's processes, not every Ray instance on the machine as Ray's own stop
# command would.
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
# Its raylet drains for up to 30 s when an actor outlived the jobs (Ray Train leaves one); its
# workers are gone by then, so after 10 s the head's remaining processes are killed.
if ! gone_within 10; then
  echo "killing what is left of the head after 10 s of Ray's graceful shutdown: $(echo $(ours))"
  kill -KILL $(ours) 2>/dev/null || true
  gone_within 10 || { echo "local-head-stop.sh: processes $(echo $(ours)) of $state survived SIGKILL" >&2; exit 1; }
fi
rm -rf "$state"
echo "stopped the Ray head of $state (process $pid)"
