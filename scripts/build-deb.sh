#!/usr/bin/env bash
# `make deb`: build the Debian package from this tree with Debian's own tools
# (debhelper, dh-python/pybuild, help2man), then run lintian on it.
# Build dependencies are installed first (idempotent). The package lands in
# build/deb/. Nothing is compiled: virtfreeze is Architecture: all.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
out=$here/build/deb

log() { printf 'build-deb: %s\n' "$*" >&2; }

[ "$(id -u)" = 0 ] || { log "run as root: it installs the build dependencies"; exit 1; }

packages=(build-essential debhelper dh-python pybuild-plugin-pyproject python3-all python3-hatchling help2man
          lintian python3-click python3-jsonschema python3-libvirt python3-pluggy python3-rich python3-yaml)
# shellcheck source=apt-ensure.sh
. "$(dirname "$0")/apt-ensure.sh"
apt_ensure "build dependencies" "${packages[@]}"

version=$(dpkg-parsechangelog -l "$here/debian/changelog" -S Version)
rm -rf "$out"
mkdir -p "$out/virtfreeze-$version"
# The tree as git sees it (tracked and new files, not .venv or build output).
(cd "$here" && git ls-files -co --exclude-standard -z) | (cd "$here" && xargs -0 cp --parents -t "$out/virtfreeze-$version")
log "building virtfreeze $version in $out"
# Debian's own python3 and tools, whatever else is first on PATH (pyenv, a venv).
(cd "$out/virtfreeze-$version" && env -u VIRTUAL_ENV -u PYTHONPATH PATH=/usr/sbin:/usr/bin:/sbin:/bin \
   dpkg-buildpackage -us -uc -b >"$out/build.log" 2>&1) || {
  tail -30 "$out/build.log" >&2; log "dpkg-buildpackage failed (full log: $out/build.log)"; exit 1; }
deb=$out/virtfreeze_${version}_all.deb
log "lintian $deb"
PATH=/usr/sbin:/usr/bin:/sbin:/bin lintian --fail-on error "$deb" >&2
log "built $deb"
