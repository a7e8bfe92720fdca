#!/usr/bin/env bash
# Make sure a Docker engine answers: use the running one, else install Debian's docker.io (as
# root, on Debian/Ubuntu) and start dockerd in the background with the settings a host that
# cannot raise its hard `nofile` limit needs. Prints nothing on success but one status line.
#
#   scripts/dockerd.sh          (log: ${DOCKERD_LOG:-/tmp/kubetrain-dockerd.log})
set -euo pipefail

if docker info >/dev/null 2>&1; then
  echo "[dockerd] engine already running"
  exit 0
fi
[ "$(id -u)" = 0 ] || { echo "[dockerd] error: no Docker engine and not root: start one" >&2; exit 1; }
if ! command -v dockerd >/dev/null; then
  command -v apt-get >/dev/null || { echo "[dockerd] error: no dockerd and no apt-get" >&2; exit 1; }
  echo "[dockerd] installing docker.io"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker.io >/dev/null
fi
log="${DOCKERD_LOG:-/tmp/kubetrain-dockerd.log}"
# --default-ulimit: containers otherwise inherit a nofile limit the host cannot grant.
nohup dockerd --default-ulimit nofile=20000:20000 --default-ulimit nproc=32768:32768 \
  >"$log" 2>&1 &
echo $! >"${log%.log}.pid"
for _ in $(seq 60); do
  if docker info >/dev/null 2>&1; then
    echo "[dockerd] started (pid $(cat "${log%.log}.pid"), log $log)"
    exit 0
  fi
  sleep 1
done
echo "[dockerd] error: dockerd did not answer within 60 s; see $log" >&2
tail -20 "$log" >&2
exit 1
