"""Issue 13: the segmented layout reads what changed, falls back to comparing hashes when the dirty
bitmap cannot be trusted (with the reason logged), and every archive restores every acknowledged write.

Real writing guests, real borg (driver mode) and restic (hook mode). The bytes a run read are the
segment view's own counters (``<state>/segments/<uuid>/<disk>.read.json``, written as the view stops);
the segments a run found changed are those whose stamps moved."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.host.helpers import assert_back_on_base
from tests.host.test_restore import RIG_DIRS, assert_acked_in, setup
from tests.rig.guest import DiskSpec

SEG = 1 << 20
DISKS = [DiskSpec("vda", "qcow2", size_mib=64), DiskSpec("vdb", "raw", size_mib=32)]
SIZES = {"vda": 64 << 20, "vdb": 32 << 20}


@dataclass
class Run:
    t_before: float  # just before the run: every write acknowledged by then is in its archive
    t_after: float  # just after it: the run's freeze happened before this
    log: str
    read: dict[str, int]  # bytes the backup tool read through each disk's segment view
    stamps: dict[str, list[int]]
    high: dict[str, int]  # the highest record acknowledged so far on each disk (a restart writes from 0 again)

    def changed_since(self, earlier: "Run | None") -> dict[str, set[int]]:
        return {t: {i for i, s in enumerate(st) if earlier is None or earlier.stamps[t][i] != s}
                for t, st in self.stamps.items()}


def _state(vf, g) -> Path:
    return vf.state / "segments" / g.uuid


def _segments_written(g, target: str, since: float, until: float, above: int = -1) -> set[int]:
    """Segments of the records acknowledged between two moments; with `above`, only of records newer than
    that one (a restarted guest writes the same records into the same sectors again: no change of content)."""
    nslots = SIZES[target] // 512
    return {((a.seq * g.stride) % nslots) * 512 // SEG for a in g.watcher.snapshot()
            if a.disk == target and since < a.t < until and a.seq > above}


def _finish(vf, g, t_before: float, log: str, earlier: Run | None = None) -> Run:
    state = _state(vf, g)
    read = {t: json.loads((state / f"{t}.read.json").read_text())["bytes_read"] for t in g.disks}
    stamps = {t: json.loads((state / f"{t}.stamps.json").read_text())["stamps"] for t in g.disks}
    t_after = time.monotonic()
    high = {t: max([a.seq for a in g.watcher.snapshot() if a.disk == t and a.t < t_after]
                   + [earlier.high[t] if earlier else -1]) for t in g.disks}
    return Run(t_before, t_after, log, read, stamps, high)


def _forget_counters(vf, g) -> None:
    """No counters of an earlier run can pass for this one's."""
    for f in _state(vf, g).glob("*.read.json"):
        f.unlink()


def _backup(vf, env, g, target: str, earlier: Run | None, *args: str) -> Run:
    _forget_counters(vf, g)
    g.watcher.wait_acks(20, after=time.monotonic())
    t_before = time.monotonic()
    proc = vf("--json", "backup", "--target", target, *args, g.name, env=env)
    out = json.loads(proc.stdout)
    assert out["backups"][0]["ok"] and len(out["verified"]) == ("--verify" in args) \
        and all(v["ok"] for v in out["verified"]), proc.stdout
    return _finish(vf, g, t_before, proc.stderr, earlier)


KNOWN = {"vda": [(20 * SEG - 65536, 131072), (50 * SEG + 4096, 8192)], "vdb": [(10 * SEG, 4096)]}


def _write_known_regions(g) -> dict[str, set[int]]:
    """Write the KNOWN regions through the guest's own disk devices (QEMU's block layer, as the guest's
    writes go, so a dirty bitmap sees them); return the segments they touch."""
    targets = sorted(g.disks)
    for target, regions in KNOWN.items():
        device = f"/machine/peripheral/virtio-disk{targets.index(target)}/virtio-backend"
        for offset, length in regions:
            out = subprocess.run(["virsh", "qemu-monitor-command", "--hmp", g.name,
                                  f'qemu-io -d {device} "write -P 0x5a {offset} {length}"'],
                                 check=True, capture_output=True, text=True).stdout
            assert "error" not in out.lower() and "conflict" not in out.lower(), out
    return {t: {i for o, n in r for i in range(o // SEG, (o + n - 1) // SEG + 1)} for t, r in KNOWN.items()}


def _bytes_of(segments: set[int], size: int) -> int:
    return sum(min(SEG, size - i * SEG) for i in segments)


def _assert_read_only_changed(run: Run, earlier: Run | None, g, how: dict[str, str],
                              known: dict[str, set[int]] | None = None) -> dict[str, set[int]]:
    """Each disk's log line names how it was found out; the view served exactly the changed segments,
    and they include every segment the guest wrote between the two runs (and the `known` ones)."""
    changed = run.changed_since(earlier)
    known = known or {}
    for target, source in how.items():
        size = SIZES[target]
        assert f"disk {target}: {len(changed[target])} of {size // SEG} segments changed ({source})" in run.log, \
            run.log
        assert run.read[target] == _bytes_of(changed[target], size), (target, run.read, changed[target])
        if earlier is None:
            continue
        extra = known.get(target, set())
        if source == "hashes":  # every segment whose content changed
            written = _segments_written(g, target, earlier.t_after, run.t_before, above=earlier.high[target])
            assert written | extra <= changed[target], (target, written, extra, changed[target])
        else:  # a dirty bitmap marks every write made after the last run's checkpoint, and only those
            written = _segments_written(g, target, earlier.t_after, run.t_before)
            assert written and written | extra <= changed[target], (target, written, extra, changed[target])
            window = _segments_written(g, target, earlier.t_before, run.t_after)  # the writer goes on sector by
            assert changed[target] <= window | {max(window) + 1} | extra, (target, changed[target], window)
    return changed


def test_borg_driver_mode_reads_what_changed_and_falls_back_to_hashes(guest_factory, vf, tmp_path, libvirt_conn):
    g = guest_factory(DISKS)
    env = setup(vf, tmp_path, g, export_layout="segmented", segment_size=SEG)

    first = _backup(vf, env, g, "borg", None)  # everything: no earlier state
    assert "first run (no earlier state); comparing the hash of every segment" in first.log
    _assert_read_only_changed(first, None, g, {"vda": "hashes", "vdb": "hashes"})
    assert first.read == {"vda": 64 << 20, "vdb": 32 << 20}

    known = _write_known_regions(g)  # and the guest's writer goes on
    second = _backup(vf, env, g, "borg", first)  # the checkpoint's dirty bitmap for qcow2, hashes for raw
    changed = _assert_read_only_changed(second, first, g, {"vda": "dirty bitmap", "vdb": "hashes"}, known)
    assert 2 < len(changed["vda"]) <= 8 and 1 < len(changed["vdb"]) <= 8, changed
    assert second.read["vda"] + second.read["vdb"] <= 16 * SEG

    g.dom.destroy()  # a restart, with the disks edited while no virtfreeze run was looking
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P 0x77 {30 * SEG} 65536", str(g.disks["vda"])],
                   check=True, capture_output=True)
    with open(g.disks["vdb"], "r+b") as fh:
        fh.seek(20 * SEG)
        fh.write(os.urandom(4096))
    g.start()
    restarted = _backup(vf, env, g, "borg", second)
    assert "disk vda: the guest's QEMU process is not the one the last run saw" in restarted.log
    changed = _assert_read_only_changed(restarted, second, g, {"vda": "hashes", "vdb": "hashes"})
    assert 30 in changed["vda"] and 20 in changed["vdb"], changed

    checkpoint = json.loads((_state(vf, g) / "state.json").read_text())["checkpoint"]
    g.dom.checkpointLookupByName(checkpoint).delete(0)  # the bitmap removed by hand
    lost = _backup(vf, env, g, "borg", restarted)
    assert f"disk vda: dirty bitmap {checkpoint} is missing" in lost.log
    _assert_read_only_changed(lost, restarted, g, {"vda": "hashes", "vdb": "hashes"})

    # Tracked again from the checkpoint the last run made; the archive restores and runs (--verify).
    again = _backup(vf, env, g, "borg", lost, "--verify", "--verify-seconds", "3")
    _assert_read_only_changed(again, lost, g, {"vda": "dirty bitmap", "vdb": "hashes"})
    ours = [c.getName() for c in g.dom.listAllCheckpoints(0) if c.getName().startswith("virtfreeze-")]
    assert len(ours) == 2, ours  # the one this run read and the one it made; older ones are deleted
    assert_back_on_base(g, vf)

    vf.write_config(export_layout="image")  # back to whole images: no checkpoint or state stays behind
    image_run = json.loads(vf("--json", "backup", "--target", "dir", g.name, env=env).stdout)
    assert image_run["backups"][0]["ok"], image_run
    assert [c.getName() for c in g.dom.listAllCheckpoints(0)] == [] and not _state(vf, g).exists()

    # The last archive restores as a new domain holding every write acknowledged before its freeze.
    out = json.loads(vf("--json", "restore", g.name, "--target", "borg", "--name", f"{g.name}-inc", "--no-start",
                        "--disk-dir", str(tmp_path / "restored"), env=env).stdout)["restore"]
    try:
        restored = {Path(f).name.split("-")[-1].split(".")[0]: Path(f) for f in out["files"]}
        assert_acked_in(restored, g.formats, g.acked(until=again.t_before))
        subprocess.run(["qemu-img", "check", "-q", str(restored["vda"])], check=True)
    finally:
        libvirt_conn.lookupByName(f"{g.name}-inc").undefine()


def _guest_sha256(image: Path, fmt: str, work: Path) -> str:
    """SHA-256 of an image's guest-visible bytes (qemu-img reads it beside its user)."""
    raw = work / "guest.raw"
    subprocess.run(["qemu-img", "convert", "-U", "-f", fmt, "-O", "raw", str(image), str(raw)], check=True)
    try:
        with open(raw, "rb") as fh:
            return hashlib.file_digest(fh, "sha256").hexdigest()
    finally:
        raw.unlink()


def test_restic_hook_mode_restores_byte_identical_to_the_frozen_disk(guest_factory, vf, tmp_path, libvirt_conn):
    """A qcow2 disk on a template (its guest view reads through the chain) and a qcow2 disk on a block
    device: both come back holding the guest bytes they held while frozen."""
    g = guest_factory([DiskSpec("vda", "qcow2", size_mib=64, template=True),
                       DiskSpec("vdb", "qcow2", size_mib=32, block=True)])
    vf.write_config(export_layout="segmented", segment_size=SEG, restore_directories=[str(g.workdir), *RIG_DIRS])
    env = dict(os.environ, RESTIC_REPOSITORY=str(tmp_path / "repo.restic"), RESTIC_PASSWORD="pw")
    subprocess.run(["restic", "-q", "init"], check=True, capture_output=True, env=env)
    export = vf.export / g.name

    runs, frozen_sha = [], {}
    for _ in range(2):  # as contrib/restic/restic-backup-vms does: freeze, back up the export view, thaw
        _forget_counters(vf, g)
        g.watcher.wait_acks(20, after=time.monotonic())
        t_before = time.monotonic()
        log = vf("freeze", "--memory", g.name).stderr  # a checkpoint beside a memory snapshot too
        frozen_sha = {t: _guest_sha256(p, "qcow2", tmp_path) for t, p in g.disks.items()}  # stable while frozen
        subprocess.run(["restic", "-q", "backup", "--host", "h", str(export)], check=True, env=env)
        vf("thaw", g.name)
        runs.append(_finish(vf, g, t_before, log, runs[-1] if runs else None))
    _assert_read_only_changed(runs[0], None, g, {"vda": "hashes", "vdb": "hashes"})
    changed = _assert_read_only_changed(runs[1], runs[0], g, {"vda": "dirty bitmap", "vdb": "dirty bitmap"})
    assert all(0 < len(c) <= 8 for c in changed.values()), changed
    assert_back_on_base(g, vf)

    dest = tmp_path / "restic-restore"
    subprocess.run(["restic", "-q", "restore", "latest", "--target", str(dest)], check=True, env=env)
    from_dir = dest / str(export).lstrip("/")
    for t in g.disks:  # `cat` restores it by hand
        joined = hashlib.sha256(b"".join(p.read_bytes() for p in sorted((from_dir / f"disks/{t}.segments").iterdir())))
        assert joined.hexdigest() == frozen_sha[t], t
    out = json.loads(vf("--json", "restore", "--from", str(from_dir), "--name", f"{g.name}-r", "--no-start",
                        "--disk-dir", str(tmp_path / "restored")).stdout)["restore"]
    try:
        images = {Path(f).name.split("-")[-1].split(".")[0]: Path(f) for f in out["files"]}
        formats = {"vda": "qcow2", "vdb": "raw"}  # a disk that was a block device comes back as a raw file
        assert {t: p.suffix for t, p in images.items()} == {"vda": ".qcow2", "vdb": ".raw"}
        for t, image in images.items():
            assert _guest_sha256(image, formats[t], tmp_path) == frozen_sha[t], t
        assert_acked_in(images, formats, g.acked(until=runs[1].t_before))
    finally:
        libvirt_conn.lookupByName(f"{g.name}-r").undefine()


def test_borgmatic_hook_mode_reads_what_changed(guest_factory, vf, tmp_path):
    """contrib's borgmatic 2.x recipe, unchanged but for its paths: borg's own files cache (no per-domain
    suffix in hook mode) skips the unchanged segments of the second night."""
    from tests.host.test_contrib import ENV, borgmatic, borgmatic_config, init_repo
    from tests.rig.integrity import check_image

    g = guest_factory([DiskSpec("vda", "qcow2", size_mib=64)])
    vf.write_config(export_layout="segmented", segment_size=SEG)
    repo = tmp_path / "repo.borg"
    config = borgmatic_config("2.x", vf, g.name, repo, tmp_path)
    init_repo("2.x", config)
    runs = []
    for _ in range(2):
        _forget_counters(vf, g)
        g.watcher.wait_acks(20, after=time.monotonic())
        t_before = time.monotonic()
        borgmatic("2.x", config, "create")
        log = subprocess.run(["borg", "list", "--short", str(repo)], check=True, capture_output=True, text=True,
                             env=dict(os.environ, **ENV)).stdout  # (the freeze's log went to borgmatic)
        runs.append(_finish(vf, g, t_before, log, runs[-1] if runs else None))
    assert runs[0].read["vda"] == 64 << 20
    changed = runs[1].changed_since(runs[0])["vda"]
    assert 0 < len(changed) <= 8 and runs[1].read["vda"] == _bytes_of(changed, SIZES["vda"]), (changed, runs[1].read)
    assert_back_on_base(g, vf)

    dest = tmp_path / "extracted"
    dest.mkdir()
    last = runs[1].log.split()[-1]
    subprocess.run(["borg", "extract", f"{repo}::{last}"], check=True, cwd=dest, env=dict(os.environ, **ENV))
    segments = dest / str(vf.export).lstrip("/") / g.name / "disks" / "vda.segments"
    joined = tmp_path / "vda.raw"
    joined.write_bytes(b"".join(p.read_bytes() for p in sorted(segments.iterdir())))
    report = check_image(joined, "vda", g.acked(until=runs[1].t_before)["vda"], "raw")
    assert report.checked > 0 and report.ok, report


def test_restic_driver_mode_reads_what_changed(guest_factory, vf, tmp_path, libvirt_conn):
    g = guest_factory([DiskSpec("vda", "qcow2", size_mib=64)])
    env = setup(vf, tmp_path, g, export_layout="segmented", segment_size=SEG)
    first = _backup(vf, env, g, "restic", None)
    second = _backup(vf, env, g, "restic", first)
    assert first.read["vda"] == 64 << 20
    _assert_read_only_changed(second, first, g, {"vda": "dirty bitmap"})
    assert 0 < second.read["vda"] <= 8 * SEG
    out = json.loads(vf("--json", "restore", g.name, "--target", "restic", "--name", f"{g.name}-r", "--no-start",
                        "--disk-dir", str(tmp_path / "restored"), env=env).stdout)["restore"]
    try:
        assert_acked_in({"vda": Path(out["files"][0])}, {"vda": "qcow2"}, g.acked(until=second.t_before))
    finally:
        libvirt_conn.lookupByName(f"{g.name}-r").undefine()


@pytest.mark.exclusive  # a bare `thaw` merges every frozen domain on the host this run may merge
def test_a_bare_thaw_stops_guest_views_no_freeze_is_recorded_for(vf, tmp_path):
    """A guest view (qemu-storage-daemon) whose run lost its journal record does not outlive the next thaw."""
    from virtfreeze import guest_view
    from virtfreeze.export_view import mounts_under, pids_serving

    image = tmp_path / "lost.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "8M"], check=True)
    views = guest_view.directory(vf.state, "00000000-0000-4000-8000-00000000dead")
    guest_view.start(str(image), "qcow2", views / "vda.raw", domain="lost", disk="vda")
    assert len(pids_serving(views)) == 1 and mounts_under(views)
    vf("thaw")
    assert pids_serving(views) == [] and not views.exists()
