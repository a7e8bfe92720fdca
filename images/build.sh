#!/usr/bin/env bash
# Build the kubetrain images with BuildKit, with no build-host secret left in them.
#
#   images/build.sh [runtime] [trainer]     (default: runtime)
#
# Env:
#   IMAGE_BASE   auto (default): the Dockerfile's pinned official base if it is present or can be
#                pulled, else a local debootstrap base (images/base.sh) -- the case with no
#                registry; "local": always the debootstrap base; anything else: that image.
#                The trainer image is the exception to auto: without its CUDA base it is skipped
#                (a message says so); IMAGE_BASE=local builds it on the debootstrap base with
#                PyPI's CUDA torch instead (a ~2.7 GB download, a ~6 GB image).
#   REGISTRY     image name prefix (default ghcr.io/kubetrain, as in kubetrain.launch.image)
#   TAG          image tag (default: the package version, so kubetrain.launch.image finds it)
#   ENGINE       docker (default) or podman; DOCKER=/path/to/docker picks a docker CLI
#   BUILD_FLAGS  extra build flags, e.g. "--no-cache"
#
# The host's pip settings (`pip config list`: CA bundle, indexes, constraints, find-links) are
# mirrored into the build: the CA bundle, constraints and a generated pip.conf go in as build
# secrets, local wheels (find-links) as a bind mount of .whl/. None of them lands in a layer.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
# shellcheck source=images/engine.sh
source images/engine.sh

targets=("$@")
[ "${#targets[@]}" -gt 0 ] || targets=(runtime)
registry="${REGISTRY:-ghcr.io/kubetrain}"
version="$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -1)"
tag="${TAG:-$version}"
revision="$(git rev-parse HEAD 2>/dev/null || echo unknown)"
if [ -n "$(git status --porcelain 2>/dev/null)" ]; then revision="$revision-dirty"; fi
created="$(git log -1 --format=%cI 2>/dev/null || date -u +%Y-%m-%dT%H:%M:%SZ)"

# --- pip settings -> build secrets + .whl/ ---------------------------------------------------
secrets_dir="$(mktemp -d "${TMPDIR:-/tmp}/kubetrain-build.XXXXXX")"
trap 'rm -rf "$secrets_dir"' EXIT
mkdir -p .whl
python3 images/pip_settings.py --out "$secrets_dir" --wheels .whl
secret_args=()
for name in pip_conf pip_cert pip_constraint; do
  [ -f "$secrets_dir/$name" ] && secret_args+=(--secret "id=$name,src=$secrets_dir/$name")
done

# --- base images -----------------------------------------------------------------------------
default_base() { sed -n 's/^ARG BASE_IMAGE=//p' "images/$1/Dockerfile" | head -1; }

have_or_pull() {
  "${ENGINE_CLI[@]}" image inspect "$1" >/dev/null 2>&1 && return 0
  log "pulling $1"
  timeout "${PULL_TIMEOUT:-300}" "${ENGINE_CLI[@]}" pull "$1" >/dev/null 2>&1
}

base_for() { # $1 = image dir; prints the BASE_IMAGE to pass ("" = the Dockerfile default)
  local wanted="${IMAGE_BASE:-auto}" official
  official="$(default_base "$1")"
  case "$wanted" in
    auto)
      if have_or_pull "$official"; then echo ""; else
        log "$official is not reachable: using a local debootstrap base"
        images/base.sh
      fi ;;
    local) images/base.sh ;;
    *) echo "$wanted" ;;
  esac
}

# BUILD_FLAGS: extra build flags, split on spaces (e.g. "--no-cache --progress=plain").
read -r -a build_flags <<<"${BUILD_FLAGS:-}"

torch_args=()
cpu_wheel="$(find .whl -maxdepth 1 -name 'torch-*+cpu-*.whl' | sort | tail -1)"
if [ -n "$cpu_wheel" ]; then
  # A local CPU wheel (the host's find-links): install it and never ask the PyTorch index.
  torch_version="$(basename "$cpu_wheel" | cut -d- -f2)"
  torch_args=(--build-arg TORCH_INDEX_URL= --build-arg "TORCH_SPEC=torch==$torch_version")
fi

for target in "${targets[@]}"; do
  [ -f "images/$target/Dockerfile" ] || die "no images/$target/Dockerfile"
  image="$registry/kubetrain-$target:$tag"
  base_args=()
  if [ "$target" = trainer ] && [ "${IMAGE_BASE:-auto}" = auto ] &&
    ! have_or_pull "$(default_base trainer)"; then
    log "skipping the trainer image: its CUDA base $(default_base trainer) is not reachable" \
      "(IMAGE_BASE=local builds it on the debootstrap base with PyPI's CUDA torch, a ~2.7 GB" \
      "download; or set IMAGE_BASE to a base you have, or build where the registry is)"
    continue
  fi
  base="$(base_for "$target")"
  [ -n "$base" ] && base_args=(--build-arg "BASE_IMAGE=$base")
  extra=()
  [ "$target" = runtime ] && extra=("${torch_args[@]}")
  log "building $image${base:+ on $base}"
  start=$SECONDS
  "${BUILD_CMD[@]}" -f "images/$target/Dockerfile" -t "$image" \
    "${base_args[@]}" "${extra[@]}" "${secret_args[@]}" \
    --build-arg "VERSION=$version" --build-arg "REVISION=$revision" \
    --build-arg "CREATED=$created" \
    "${build_flags[@]}" .
  size="$("${ENGINE_CLI[@]}" image inspect --format '{{.Size}}' "$image")"
  log "built $image in $((SECONDS - start)) s ($((size / 1000000)) MB)"
done
