#!/usr/bin/env python3
"""The main job, end to end, on a throwaway writing VM (`make demo`).

prepare host (Makefile) -> boot a demo VM that keeps writing -> virtfreeze
freeze -> borg create of the export view into a local repository ->
virtfreeze thaw -> list and verify the archive -> print what was measured ->
clean up. Everything lives under /var/tmp/virtfreeze-demo and is removed
before and after the run.
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

from tests.rig.acks import max_gap  # noqa: E402
from tests.rig.guest import DiskSpec, create_guest  # noqa: E402
from tests.rig.integrity import check_image  # noqa: E402

NAME = "virtfreeze-demo"
WORK = Path(os.environ.get("VIRTFREEZE_DEMO_DIR", "/var/tmp/virtfreeze-demo"))
VIRTFREEZE = [sys.executable, "-m", "virtfreeze"]


def say(msg: str) -> None:
    print(f"demo: {msg}", flush=True)


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    say("$ " + " ".join(str(c) for c in cmd))
    return subprocess.run(cmd, check=True, text=True, **kw)


def cleanup(conn: libvirt.virConnect) -> None:
    """Remove whatever an earlier or this run left: the demo VM, mounts, files."""
    try:
        dom = conn.lookupByName(NAME)
        if dom.isActive():
            dom.destroy()
        dom.undefine()
    except libvirt.libvirtError:
        pass
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
    config.write_text(f"state_directory: {WORK}/state\nexport_directory: {WORK}/export\n")
    vf = [*VIRTFREEZE, "--config", str(config)]
    repo = WORK / "borg-repo"
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
        frozen = json.loads(run([*vf, "--json", "freeze", NAME], capture_output=True).stdout)["frozen"][0]
        t_frozen = time.monotonic()
        say(f"frozen ({frozen['consistency']}): {', '.join(frozen['disks'])}; the VM keeps writing into overlays")
        export = Path(frozen["export_dir"])
        run(["borg", "create", "--stats", f"{repo}::{NAME}-{{now:%Y-%m-%dT%H:%M:%S}}", "."], cwd=export, env=env)
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

        guest.dom.destroy()
        ok = True
        for target, fmt in (("vda", "qcow2"), ("vdb", "raw")):
            archived = check_image(restore / "disks" / f"{target}.{fmt}", target, guest.acked(until=t_freeze)[target], fmt)
            merged = guest.check(target)
            say(f"archive: {archived}")
            say(f"live disk: {merged}")
            ok = ok and archived.ok and merged.ok and archived.checked > 0
        left = list((WORK / "vm").glob("*.virtfreeze*.qcow2"))
        ok = ok and not left and not (WORK / "export" / NAME).exists()

        say("measured:")
        say(f"  freeze {t_frozen - t_freeze:.2f}s (snapshot {frozen['snapshot_seconds']:.3f}s), "
            f"borg create {t_thaw - t_frozen:.2f}s, thaw {t_end - t_thaw:.2f}s ({thawed['strategy']})")
        say(f"  overlay bytes merged: {thawed['overlay_bytes']}")
        say(f"  guest-visible stall over the whole cycle: {stall * 1000:.0f} ms "
            f"(baseline without backup: {baseline * 1000:.0f} ms)")
        say(f"  writes acknowledged: {sum(len(v) for v in guest.acked().values())}; overlays left: {len(left)}")
        say("OK: every acknowledged write is in the archive (up to the freeze) and in the merged disks"
            if ok else "FAILED: see above")
        return 0 if ok else 1
    finally:
        guest.remove()
        cleanup(conn)


if __name__ == "__main__":
    sys.exit(main())
