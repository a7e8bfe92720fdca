#!/usr/bin/env bash
# Make a base image with no registry: Debian bookworm minbase + python3 (3.11) + venv, built by
# debootstrap and imported into the engine. Prints the image name. Needs root and debootstrap.
#
#   images/base.sh [IMAGE]      (default kubetrain-base:bookworm-py311; kept if it exists)
#
# Env: ENGINE (docker|podman, default: the one images/engine.sh picks), DEBIAN_MIRROR,
#      FORCE=1 to rebuild an existing base.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=images/engine.sh
source "$here/engine.sh"

image="${1:-kubetrain-base:bookworm-py311}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"

if [ "${FORCE:-0}" != 1 ] && "${ENGINE_CLI[@]}" image inspect "$image" >/dev/null 2>&1; then
  echo "$image"
  exit 0
fi
command -v debootstrap >/dev/null || die "debootstrap is not installed (apt-get install debootstrap)"
[ "$(id -u)" = 0 ] || die "debootstrap needs root"

rootfs="$(mktemp -d "${TMPDIR:-/tmp}/kubetrain-rootfs.XXXXXX")"
trap 'rm -rf "$rootfs"' EXIT
log "debootstrap bookworm (minbase + python3) from $mirror"
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
  bookworm "$rootfs" "$mirror" >"$rootfs.log" 2>&1 || {
  tail -20 "$rootfs.log" >&2
  die "debootstrap failed (full log: $rootfs.log)"
}
rm -f "$rootfs.log"
# What a container never needs: package lists, docs, man pages, translations, logs.
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/usr/share/doc/* \
  "$rootfs"/usr/share/man/* "$rootfs"/usr/share/locale/* "$rootfs"/var/log/*.log
log "importing $image"
tar --numeric-owner -C "$rootfs" -c . |
  "${ENGINE_CLI[@]}" import --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' - "$image" >/dev/null
echo "$image"
