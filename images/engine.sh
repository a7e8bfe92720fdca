# shellcheck shell=bash
# Sourced by the scripts in images/: picks the container engine and a BuildKit-capable way to
# build. Sets ENGINE (docker|podman), ENGINE_CLI (array) and BUILD_CMD (array: build command
# taking docker-build flags). Override with ENGINE=podman or DOCKER=/path/to/docker.

log() { echo "[images] $*" >&2; }
die() {
  echo "[images] error: $*" >&2
  exit 1
}

_docker_candidates() {
  if [ -n "${DOCKER:-}" ]; then echo "$DOCKER"; else type -ap docker; fi
}

if [ -z "${ENGINE:-}" ]; then
  if command -v docker >/dev/null || [ -n "${DOCKER:-}" ]; then ENGINE=docker
  elif command -v podman >/dev/null; then ENGINE=podman
  else die "no container engine: install docker (docker.io) or podman"
  fi
fi

case "$ENGINE" in
  docker)
    BUILD_CMD=()
    # A docker CLI with the buildx plugin builds with BuildKit; without it, a CLI older than 23
    # (Debian's docker.io 20.10) still has BuildKit built in behind DOCKER_BUILDKIT=1.
    while read -r cli; do
      [ -n "$cli" ] || continue
      if "$cli" buildx version >/dev/null 2>&1; then
        ENGINE_CLI=("$cli"); BUILD_CMD=("$cli" buildx build --load); break
      fi
      if DOCKER_BUILDKIT=1 "$cli" build --help 2>/dev/null | grep -q -- '--secret'; then
        ENGINE_CLI=("$cli"); BUILD_CMD=(env DOCKER_BUILDKIT=1 "$cli" build); break
      fi
    done < <(_docker_candidates)
    [ "${#BUILD_CMD[@]}" -gt 0 ] ||
      die "no docker CLI with BuildKit (install the buildx plugin, or set DOCKER=/usr/bin/docker)"
    export DOCKER="${ENGINE_CLI[0]}" # scripts sourcing this again skip the search
    "${ENGINE_CLI[0]}" info >/dev/null 2>&1 ||
      die "the Docker engine is not running (scripts/dockerd.sh starts one)"
    ;;
  podman)
    ENGINE_CLI=(podman)
    BUILD_CMD=(podman build --format docker)
    ;;
  *) die "ENGINE must be docker or podman (got '$ENGINE')" ;;
esac
export ENGINE
