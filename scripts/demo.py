#!/usr/bin/env python3
"""The main job, end to end, on a throwaway writing VM (`make demo`).

prepare host (Makefile) -> boot a demo VM that keeps writing -> virtfreeze
freeze --memory -> borg create of the export view into a local repository
(through `virtfreeze behind-guests`, as the recipes run it) ->
virtfreeze thaw -> list and verify the archive -> virtfreeze restore of the
archive as a new VM beside the original, resumed from memory -> check both
-> print what was measured -> clean up. Everything lives under
/var/tmp/virtfreeze-demo and is removed before and after the run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import libvirt  # noqa: E402

from tests.rig.acks import AckWatcher, acked_by_disk, max_gap  # noqa: E402
from tests.rig.guest import SOCKET_DIR, DiskSpec, create_guest, remove_domain  # noqa: E402
from tests.rig.guest_image import cache_dir  # noqa: E402
from tests.rig.integrity import check_image  # noqa: E402

NAME = "virtfreeze-demo"
RESTORED = "virtfreeze-demo-restored"
WORK = Path(os.environ.get("VIRTFREEZE_DEMO_DIR", "/var/tmp/virtfreeze-demo"))
VIRTFREEZE = [sys.executable, "-m", "virtfreeze"]


def say(msg: str) -> None:
    print(f"demo: {msg}", flush=True)


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    say("$ " + " ".join(str(c) for c in cmd))
    return subprocess.run(cmd, check=True, text=True, **kw)


def cleanup(conn: libvirt.virConnect) -> None:
    """Remove whatever an earlier or this run left: the demo VMs, mounts, files."""
    for name in (NAME, RESTORED):
        remove_domain(conn, name=name)
    with open("/proc/self/mountinfo") as fh:
        mounts = [line.split()[4] for line in fh if line.split()[4].startswith(str(WORK) + "/")]
    for mp in sorted(mounts, key=len, reverse=True):
        subprocess.run(["umount", mp], check=False)
    shutil.rmtree(WORK, ignore_errors=True)


def main() -> int:
    libvirt.registerErrorHandler(lambda ctx, err: None, None)  # we report errors ourselves
    conn = libvirt.open("qemu:///system")
    cleanup(conn)
    WORK.mkdir(parents=True)
    config = WORK / "virtfreeze.yaml"
    repo = WORK / "borg-repo"
    config.write_text(json.dumps({  # JSON is YAML
        "state_directory": f"{WORK}/state", "export_directory": f"{WORK}/export",
        "targets": {"demo": {"type": "borg", "repository": str(repo)}},
        "restore_directories": [str(WORK), str(SOCKET_DIR), str(cache_dir())],  # its disks, sockets, kernel
    }))
    vf = [*VIRTFREEZE, "--config", str(config)]
    env = dict(os.environ, BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK="yes", BORG_RELOCATED_REPO_ACCESS_IS_OK="yes")

    t0 = time.monotonic()
    guest = create_guest(conn, WORK / "vm", [DiskSpec("vda", "qcow2", 64), DiskSpec("vdb", "raw", 32)], name=NAME)
    try:
        say(f"VM {NAME} booted and writing after {time.monotonic() - t0:.1f}s")
        run(["borg", "init", "--encryption=none", str(repo)], env=env)

        t_base = time.monotonic()
        guest.watcher.wait_acks(300)
        baseline = max_gap(guest.watcher.snapshot(), t_base, time.monotonic())

        t_freeze = time.monotonic()
        frozen = json.loads(run([*vf, "--json", "freeze", "--memory", NAME], capture_output=True).stdout)["frozen"][0]
        t_frozen = time.monotonic()
        say(f"frozen ({frozen['consistency']}): {', '.join(frozen['disks'])}; the VM keeps writing into overlays")
        export = Path(frozen["export_dir"])
        run([*vf, "behind-guests", "--", "borg", "create", "--stats",  # as the recipes run borg: behind the VM
             f"{repo}::{NAME}-{{utcnow:%Y-%m-%dT%H:%M:%SZ}}", "."], cwd=export, env=env)
        t_thaw = time.monotonic()
        thawed = json.loads(run([*vf, "--json", "thaw", NAME], capture_output=True).stdout)["thawed"][0]
        t_end = time.monotonic()
        guest.watcher.wait_acks(100, after=t_end)
        stall = max_gap(guest.watcher.snapshot(), t_freeze, t_end)

        archives = run(["borg", "list", "--short", str(repo)], capture_output=True, env=env).stdout.split()
        run(["borg", "list", f"{repo}::{archives[-1]}"], env=env)
        restore = WORK / "restore"
        restore.mkdir()
        run(["borg", "extract", "--sparse", f"{repo}::{archives[-1]}"], cwd=restore, env=env)

        # Restore the archive as a new VM beside the original, resumed from its memory state.
        t_restore = time.monotonic()
        restored = json.loads(run([*vf, "--json", "restore", NAME, "--target", "demo", "--name", RESTORED],
                                  capture_output=True, env=env).stdout)["restore"]
        t_restored = time.monotonic()
        say(f"restored {RESTORED} ({restored['state']}, from memory: {restored['from_memory']}) "
            f"in {t_restored - t_restore:.2f}s; it continues where {NAME} was frozen")
        clone = conn.lookupByName(RESTORED)
        clone_xml = clone.XMLDesc(0)
        sock = next(p for p in SOCKET_DIR.glob("*.sock") if str(p) in clone_xml)
        watcher = AckWatcher(sock)
        try:
            last = {d: max(v) for d, v in guest.acked(until=t_freeze).items()}
            watcher.wait_for(lambda acks: all(sum(a.disk == d and a.seq > s for a in acks) >= 20 for d, s in last.items()),
                             120, "the restored VM's writes past the freeze")
            resumed = not watcher.booted.is_set()
            clone.destroy()
            clone_acks = acked_by_disk(watcher.snapshot())
        finally:
            watcher.close()

        guest.dom.destroy()
        ok = resumed and restored["from_memory"]
        for target, fmt in (("vda", "qcow2"), ("vdb", "raw")):
            archived = check_image(restore / "disks" / f"{target}.{fmt}", target, guest.acked(until=t_freeze)[target], fmt)
            merged = guest.check(target)
            image = Path(restored["files"][["vda", "vdb"].index(target)])
            again = check_image(image, target, sorted(set(guest.acked(until=t_freeze)[target])
                                                       | set(clone_acks.get(target, []))), fmt)
            say(f"archive: {archived}")
            say(f"live disk: {merged}")
            say(f"restored VM's disk (before the freeze and since the restore): {again}")
            ok = ok and archived.ok and merged.ok and again.ok and archived.checked > 0
        left = list((WORK / "vm").glob("*.virtfreeze*.qcow2"))
        ok = ok and not left and not (WORK / "export" / NAME).exists()

        say("measured:")
        say(f"  freeze {t_frozen - t_freeze:.2f}s (snapshot {frozen['snapshot_seconds']:.3f}s), "
            f"borg create {t_thaw - t_frozen:.2f}s, thaw {t_end - t_thaw:.2f}s ({thawed['strategy']})")
        say(f"  overlay bytes merged: {thawed['overlay_bytes']}")
        say(f"  guest-visible stall over the whole cycle: {stall * 1000:.0f} ms "
            f"(baseline without backup: {baseline * 1000:.0f} ms)")
        say(f"  restore as a new VM, resumed from memory: {t_restored - t_restore:.2f}s "
            f"({restored['bytes'] >> 20} MiB); it did not boot: {resumed}")
        say(f"  writes acknowledged: {sum(len(v) for v in guest.acked().values())}; overlays left: {len(left)}")
        say("OK: every acknowledged write is in the archive (up to the freeze), in the merged disks and in the "
            "restored VM's disks" if ok else "FAILED: see above")
        return 0 if ok else 1
    finally:
        guest.remove()
        cleanup(conn)  # the restored VM and its files (under WORK) too


if __name__ == "__main__":
    sys.exit(main())
