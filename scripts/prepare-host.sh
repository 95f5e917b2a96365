#!/usr/bin/env bash
# Prepare this machine to run virtfreeze for real: Debian packages, a
# virtualenv with virtfreeze installed, and a running libvirtd.
#
# Used by both of the README's commands (`make demo`, `make test`).
# Idempotent: every step checks before it acts, so running it again is cheap.
# Works with or without systemd: where there is none, libvirtd is started by
# hand (see shared/FACTS.md, "A real libvirt/QEMU host").
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
venv=${VIRTFREEZE_VENV:-$here/.venv}
python=${PYTHON:-python3}

log() { printf 'prepare-host: %s\n' "$*" >&2; }
die() { printf 'prepare-host: error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root: it installs Debian packages and starts libvirtd"

# --- Debian packages -------------------------------------------------------
packages=(
  libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients
  qemu-system-x86 qemu-utils dnsmasq-base
  libfuse3-3                      # the export view of block-device disks (FUSE, through the vendored mfusepy)
  libvirt-dev pkg-config          # to build libvirt-python (PyPI has no wheels)
  busybox-static cpio xz-utils    # the writing test guest's initramfs
  e2fsprogs                       # the agent test guest's ext4 filesystem (mkfs.ext4, debugfs, e2fsck)
  lzop                            # memory images a host compresses (qemu.conf snapshot_image_format), tested
  borgbackup restic borgmatic     # the demo's and the tests' backup tools
  systemd                         # systemd-analyze checks contrib/systemd (no systemd needs to run)
  prometheus prometheus-node-exporter   # promtool checks contrib/prometheus; node_exporter scrapes the metrics
  ovmf swtpm swtpm-tools          # UEFI and TPM guests: restore puts back their NVRAM and TPM state
  pipx python3-venv python3-build python3-hatchling   # the pipx install, tested with Debian's own libraries:
  python3-libvirt python3-click python3-pluggy python3-yaml python3-jsonschema python3-rich
)
# shellcheck source=apt-ensure.sh
. "$(dirname "$0")/apt-ensure.sh"
apt_ensure "Debian packages" "${packages[@]}"

# --- libvirtd -------------------------------------------------------------
# libvirt runs swtpm_setup as the user tss; a certificate authority state that a run as root left
# behind (swtpm_localca's lock file) makes every new TPM fail: "Need read/write rights".
if [ -d /var/lib/swtpm-localca ] && getent passwd tss >/dev/null; then
  find /var/lib/swtpm-localca ! -user tss -exec chown tss {} + 2>/dev/null || true
fi
getent group kvm >/dev/null || groupadd -r kvm
getent group libvirt-qemu >/dev/null || groupadd -r libvirt-qemu
getent group libvirt >/dev/null || groupadd -r libvirt
getent passwd libvirt-qemu >/dev/null || \
  useradd -r -g libvirt-qemu -G kvm -d /var/lib/libvirt -s /usr/sbin/nologin libvirt-qemu

# QEMU runs as root so it can open test images anywhere (tmp directories).
qemu_conf=/etc/libvirt/qemu.conf
if ! grep -q '^# virtfreeze prepare-host' "$qemu_conf" 2>/dev/null; then
  log "configuring $qemu_conf (user/group root)"
  {
    echo '# virtfreeze prepare-host'
    echo 'user = "root"'
    echo 'group = "root"'
  } >>"$qemu_conf"
fi

# A host test that changes qemu.conf (tests/host/helpers.py, qemu_conf_setting) puts it back when it
# ends; one killed before that leaves its line behind: remove it, and restart a daemon that read it.
if grep -q '^# virtfreeze test setting' "$qemu_conf"; then
  log "removing a test setting a killed test left in $qemu_conf"
  sed -i '/^# virtfreeze test setting/,+1d' "$qemu_conf"
  pkill -x libvirtd || true
fi

uri=qemu:///system
answers() { virsh -c "$uri" version >/dev/null 2>&1; }

# Start a daemon unless one runs; a daemon still exiting (killed, restarted)
# is waited for and then started anew. $2 is the socket it serves.
ensure_daemon() {
  local name=$1 sock=$2
  for _ in $(seq 1 600); do
    if ! pgrep -x "$name" >/dev/null; then
      "$name" -d
    elif [ -S "$sock" ]; then
      return 0
    fi
    sleep 0.1
  done
  die "$name did not start within 60s; see /var/log/libvirt/$name.log"
}

if ! answers; then
  if [ -d /run/systemd/system ]; then
    log "starting libvirtd through systemd"
    systemctl start libvirtd
  else
    log "starting virtlogd and libvirtd by hand (no systemd)"
    mkdir -p /var/log/libvirt/qemu /run/libvirt
    ensure_daemon virtlogd /run/libvirt/virtlogd-sock
    ensure_daemon libvirtd /run/libvirt/libvirt-sock
  fi
  # It answers once its drivers are up; one that runs but never answers is stuck.
  for _ in $(seq 1 600); do
    answers && break
    [ -d /run/systemd/system ] || pgrep -x libvirtd >/dev/null || libvirtd -d  # exited meanwhile
    sleep 0.1
  done
  answers || die "libvirtd did not answer on $uri within 60s; see /var/log/libvirt/libvirtd.log"
fi
log "libvirtd answers on $uri"

# --- virtualenv with virtfreeze -------------------------------------------
if [ ! -x "$venv/bin/python" ]; then
  log "creating virtualenv $venv"
  "$python" -m venv "$venv"
fi
stamp=$venv/.virtfreeze-installed
if [ ! -f "$stamp" ] || [ "$here/pyproject.toml" -nt "$stamp" ]; then
  log "installing virtfreeze (editable) with test extras into $venv"
  "$venv/bin/pip" install -q -e "$here[test]" >&2
  touch "$stamp"
fi
log "ready: $venv/bin/virtfreeze"
