# Sourced by prepare-host.sh and build-deb.sh: apt_ensure WHAT PKG... installs the Debian packages
# that are not installed yet (idempotent; one apt-get update, only when something is missing).
apt_ensure() {
  local what=$1 p
  shift
  local missing=()
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  if ((${#missing[@]})); then
    log "installing $what: ${missing[*]}"
    apt-get update -q >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
  fi
}
