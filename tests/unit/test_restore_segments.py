"""Segmented disks in an archive: checked like any archive data, and restored by reassembly (sparse),
as raw or as a qcow2 without backing file, with the restore's bookkeeping."""

import contextlib
import json
import os
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path
from types import SimpleNamespace

import pytest

from virtfreeze import restore as restore_mod
from virtfreeze.progress import Progress
from virtfreeze.restore import RestoreRecord, Source, _place_segments, _undo, reassemble, restore
from virtfreeze.restore_plan import ArchiveIncomplete, ArchiveRefused, SegmentLayout, plan_restore, read_archive

UUID = "0f5a1c6e-3b7d-4c1e-9a2b-5d6e7f8a9b0c"
MiB = 1 << 20


def domain_xml(vms: Path) -> str:
    return f"""<domain type='qemu'><name>web1</name><uuid>{UUID}</uuid><os><type>hvm</type></os>
  <devices>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{vms}/web1-vda.qcow2'/>
      <target dev='vda'/></disk>
    <disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='{vms}/web1-vdb.raw'/>
      <target dev='vdb'/></disk>
  </devices></domain>"""


def segmented(data: bytes, segment_size: int) -> list[bytes]:
    return [data[i:i + segment_size] for i in range(0, len(data), segment_size)]


def make_archive(tmp: Path, guest: bytes, *, segment_size: int = 512, fmt: str = "qcow2", disk: dict | None = None,
                 image: bytes | None = None) -> Path:
    """An archive with vda segmented (`guest`'s bytes) and, with `image`, vdb as a raw image file."""
    root = tmp / "archive"
    seg_dir = root / "disks" / "vda.segments"
    seg_dir.mkdir(parents=True)
    sizes = {}
    for i, chunk in enumerate(segmented(guest, segment_size)):
        (seg_dir / f"{i:06d}").write_bytes(chunk)
        sizes[f"disks/vda.segments/{i:06d}"] = len(chunk)
    vms = tmp / "vms"
    disks = {"vda": {"base": f"{vms}/web1-vda.qcow2", "format": fmt, "type": "file", "layout": "segmented",
                     "file": "disks/vda.segments",
                     "segments": {"segment_size": segment_size, "count": len(sizes), "size": len(guest)},
                     "backing": [], "size": len(guest)}}
    disks["vda"].update(disk or {})
    if image is not None:
        (root / "disks" / "vdb.raw").write_bytes(image)
        sizes["disks/vdb.raw"] = len(image)
        disks["vdb"] = {"base": f"{vms}/web1-vdb.raw", "format": "raw", "type": "file", "file": "disks/vdb.raw",
                        "backing": []}
    manifest = {"domain": "web1", "uuid": UUID, "state_at_freeze": "shut off", "memory": False, "disks": disks,
                "sizes": sizes, "files": ["disks/vda.segments"] + (["disks/vdb.raw"] if image is not None else [])}
    (root / "manifest.json").write_text(json.dumps(manifest))
    (root / "domain.xml").write_text(domain_xml(vms))
    return root


GUEST = bytes(range(256)) * 6 + b"tail"  # 1540 bytes: segments of 512, 512, 512 and 4


def test_a_segmented_disk_is_read_with_its_layout_beside_an_image_disk(tmp_path):
    archive = read_archive(make_archive(tmp_path, GUEST, image=b"R" * 1024))
    vda, vdb = archive.disks
    assert vda.segments == SegmentLayout(512, 4, 1540)
    assert [vda.segments.length(i) for i in range(4)] == [512, 512, 512, 4]
    assert (str(vda.image.file), vda.image.format, vda.backing) == ("disks/vda.segments", "qcow2", ())
    assert vdb.segments is None and str(vdb.image.file) == "disks/vdb.raw"


@pytest.mark.parametrize("change, match", [
    ({"layout": "chunked"}, "unknown layout 'chunked'"),
    ({"segments": {"segment_size": 512, "count": 4}}, "positive integers"),
    ({"segments": {"segment_size": 512, "count": 4, "size": "1540"}}, "positive integers"),
    ({"segments": {"segment_size": 512, "count": True, "size": 1540}}, "positive integers"),
    ({"segments": {"segment_size": 0, "count": 4, "size": 1540}}, "positive integers"),
    ({"segments": [512, 4, 1540]}, "positive integers"),
    ({"segments": {"segment_size": 768, "count": 3, "size": 1540}}, "not a power of two"),
    ({"segments": {"segment_size": 256, "count": 7, "size": 1540}}, "not a power of two"),
    ({"segments": {"segment_size": 512, "count": 5, "size": 1540}}, "5 segments cannot hold 1540 bytes"),
    ({"segments": {"segment_size": 512, "count": 3, "size": 1540}}, "3 segments cannot hold 1540 bytes"),
    ({"backing": [{"file": "disks/vda.backing-1.qcow2", "format": "qcow2", "path": "/x"}]}, "backing chain"),
    ({"size": 4096}, "disagrees"),
    ({"file": "../../etc"}, "outside itself"),
    ({"file": "/etc"}, "outside itself"),
])
def test_a_bad_segmented_manifest_is_refused_naming_the_disk(tmp_path, change, match):
    root = make_archive(tmp_path, GUEST, disk=change)
    with pytest.raises(ArchiveRefused, match=match) as e:
        read_archive(root)
    assert "vda" in str(e.value) and "\n" not in str(e.value)


def _rewrite_sizes(root: Path, **sizes) -> None:
    manifest = json.loads((root / "manifest.json").read_text())
    for name, size in sizes.items():
        key = f"disks/vda.segments/{name[1:]}"
        if size is None:
            manifest["sizes"].pop(key)
        else:
            manifest["sizes"][key] = size
    (root / "manifest.json").write_text(json.dumps(manifest))


def test_a_missing_extra_or_wrongly_sized_segment_is_caught(tmp_path):
    root = make_archive(tmp_path / "missing", GUEST)
    (root / "disks/vda.segments/000002").unlink()
    _rewrite_sizes(root, s000002=None)  # the manifest's list agrees: the layout still misses it
    with pytest.raises(ArchiveIncomplete, match="segment disks/vda.segments/000002 is missing"):
        read_archive(root)

    for extra in ("000004", "4", "0000001", "notes.txt"):
        root = make_archive(tmp_path / f"extra-{extra}", GUEST)
        (root / "disks/vda.segments" / extra).write_bytes(b"x")
        with pytest.raises(ArchiveRefused, match=f"holds {extra}, which is not one of its 4 segments"):
            read_archive(root)

    root = make_archive(tmp_path / "short", GUEST)
    (root / "disks/vda.segments/000001").write_bytes(b"x" * 100)
    _rewrite_sizes(root, s000001=100)
    with pytest.raises(ArchiveIncomplete, match="000001 holds 100 of 512 bytes"):
        read_archive(root)

    root = make_archive(tmp_path / "long-tail", GUEST)
    (root / "disks/vda.segments/000003").write_bytes(b"x" * 512)
    _rewrite_sizes(root, s000003=512)
    with pytest.raises(ArchiveIncomplete, match="000003 holds 512 of 4 bytes"):
        read_archive(root)

    root = make_archive(tmp_path / "sizes", GUEST)  # the manifest's own list catches a truncation too
    (root / "disks/vda.segments/000000").write_bytes(b"x")
    with pytest.raises(ArchiveIncomplete, match="000000 holds 1 of 512 bytes"):
        read_archive(root)

    root = make_archive(tmp_path / "link", GUEST)
    (root / "disks/vda.segments/000001").unlink()
    os.symlink("/etc/shadow", root / "disks/vda.segments/000001")
    with pytest.raises(ArchiveRefused, match="symlink"):
        read_archive(root)

    root = make_archive(tmp_path / "file", GUEST)
    os.rename(root / "disks/vda.segments", root / "disks/elsewhere")
    (root / "disks/vda.segments").write_bytes(b"")
    _rewrite_sizes(root, s000000=None, s000001=None, s000002=None, s000003=None)
    with pytest.raises(ArchiveIncomplete, match="disks/vda.segments/ is missing"):
        read_archive(root)


def test_a_segmented_disk_is_placed_by_reassembly_even_for_a_verify(tmp_path):
    archive = read_archive(make_archive(tmp_path, GUEST, image=b"R" * 1024))
    plan = plan_restore(archive, name="verify-web1", disk_dir=tmp_path / "scratch", allowed=[tmp_path],
                        overlay=True)
    kinds = {p.target: (p.kind, p.format, p.segments) for p in plan.placements}
    assert kinds["vda"] == ("disk", "qcow2", SegmentLayout(512, 4, 1540))  # not read in place
    assert kinds["vdb"][0] == "overlay"
    drivers = {d.find("target").get("dev"): d.find("driver").get("type")
               for d in ET.fromstring(plan.definition).findall("devices/disk")}
    assert drivers == {"vda": "qcow2", "vdb": "qcow2"}

    block = read_archive(make_archive(tmp_path / "block", GUEST, disk={"type": "block", "base": "/dev/vg/web1"}))
    plan = plan_restore(block, name=None, disk_dir=tmp_path / "restored", allowed=[tmp_path])
    assert [(p.dest, p.format) for p in plan.placements] == [(tmp_path / "restored" / "web1-vda.raw", "raw")]
    assert ET.fromstring(plan.definition).find("devices/disk/driver").get("type") == "raw"


def _placement(root: Path, fmt: str, dest: Path):
    archive = read_archive(root)
    plan = plan_restore(archive, name=None, disk_dir=dest.parent, allowed=[dest.parent])
    [p] = [p for p in plan.placements if p.target == "vda"]
    assert p.format == fmt
    return archive, p


def test_raw_reassembly_is_the_concatenation_and_sparse(tmp_path):
    size = 1 << 20
    data = os.urandom(size) + bytes(2 * size) + os.urandom(4096)  # the last segment is short
    root = make_archive(tmp_path, data, segment_size=size, fmt="raw")
    for f in (root / "disks/vda.segments").iterdir():  # the archived zeros are written, not holes
        assert os.stat(f).st_blocks * 512 >= os.stat(f).st_size
    archive, p = _placement(root, "raw", tmp_path / "vms" / "web1-vda.qcow2")
    out = tmp_path / "out.raw"
    seen = []
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        reassemble(archive.root / p.source, p, fd, seen.append)
    finally:
        os.close(fd)
    by_cat = b"".join(f.read_bytes() for f in sorted((root / "disks/vda.segments").iterdir()))
    assert by_cat == data and out.read_bytes() == data
    assert sum(seen) == len(data)
    assert os.stat(out).st_blocks * 512 < size + 64 * 1024  # the 2 MiB of zeros are holes


def test_reassembly_refuses_segments_that_changed_after_the_check(tmp_path):
    root = make_archive(tmp_path, GUEST, fmt="raw")
    archive, p = _placement(root, "raw", tmp_path / "vms" / "web1-vda.qcow2")
    (root / "disks/vda.segments/000003").write_bytes(b"")
    fd = os.open(tmp_path / "out", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with pytest.raises(ArchiveIncomplete, match="1536 of 1540 bytes"):
            reassemble(archive.root / p.source, p, fd)
    finally:
        os.close(fd)


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_a_placed_segmented_disk_holds_the_guest_bytes_and_is_undone_by_its_record(tmp_path, fmt):
    data = os.urandom(70144) + bytes(199680) + os.urandom(512)  # guest sizes are whole sectors; a short tail
    root = make_archive(tmp_path, data, segment_size=65536, fmt=fmt)
    dest = tmp_path / "vms" / "web1-vda.qcow2"
    archive, p = _placement(root, fmt, dest)
    staging = tmp_path / "staging"
    staging.mkdir(mode=0o700)
    record = RestoreRecord(tmp_path / "state", "web1")
    record.save(name="web1", uuid=UUID, defined=False, files=[], dirs=[], staging=str(staging))
    _place_segments(archive.root / p.source, p, staging, record, replace=False, progress=lambda n: None,
                    domain="web1")

    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(dest)], check=True,
                                     capture_output=True, text=True).stdout)
    assert info["format"] == fmt and "backing-filename" not in info and info["virtual-size"] == len(data)
    raw = tmp_path / "check.raw"
    subprocess.run(["qemu-img", "convert", "-f", fmt, "-O", "raw", str(dest), str(raw)], check=True)
    assert raw.read_bytes() == data
    assert os.stat(dest).st_mode & 0o777 == 0o600
    assert list(staging.iterdir()) == [] and sorted(os.listdir(dest.parent)) == [dest.name]  # no partial left
    assert str(dest) in record.load()["files"] and str(dest.parent) in record.load()["dirs"]

    _undo(SimpleNamespace(hv=None), record.load())  # what a failed or killed restore's clean-up does
    assert not dest.parent.exists() and not staging.exists()

    staging.mkdir(mode=0o700)  # created exclusively: never over a file that appeared meanwhile
    dest.parent.mkdir()
    dest.write_bytes(b"not ours")
    with pytest.raises(restore_mod.VirtfreezeError, match="appeared meanwhile"):
        _place_segments(archive.root / p.source, p, staging, record, replace=False, progress=lambda n: None,
                        domain="web1")
    assert dest.read_bytes() == b"not ours" and str(dest) not in record.load()["files"]


class FakeHypervisor:
    """What a restore asks libvirt, with no domain in the way; records the definition."""

    def __init__(self):
        self.defined: list[str] = []

    def info(self, uuid):
        return None

    def info_by_name(self, name):
        return None

    def pool_directories(self):
        return []

    def define(self, xml, name):
        self.defined.append(xml)


class Texts(Progress):
    def __init__(self):
        self.texts: list[str] = []

    def update(self, domain, text):
        self.texts.append(text)


@pytest.fixture
def runtime(tmp_path, monkeypatch):
    monkeypatch.setattr(restore_mod, "domain_lock", lambda *a, **k: contextlib.nullcontext())
    return SimpleNamespace(config=SimpleNamespace(restore_directories=[]), hv=FakeHypervisor(),
                           state_dir=tmp_path / "state", progress=Texts())


@pytest.mark.parametrize("overlay", [False, True])
def test_a_restore_from_a_directory_mixes_segmented_and_image_disks(tmp_path, runtime, overlay):
    data = os.urandom(5120) + bytes(3072)
    root = make_archive(tmp_path, data, image=b"R" * 4096)
    vms = tmp_path / "vms"
    result = restore(runtime, Source(directory=root), disk_dir=vms, start=False, overlay=overlay)

    vdb, vdb_format = (vms / "web1-vdb.qcow2", "qcow2") if overlay else (vms / "web1-vdb.raw", "raw")
    assert sorted(os.listdir(vms)) == sorted(["web1-vda.qcow2", vdb.name])
    for image, fmt, want in ((vms / "web1-vda.qcow2", "qcow2", data), (vdb, vdb_format, b"R" * 4096)):
        raw = tmp_path / "check.raw"
        subprocess.run(["qemu-img", "convert", "-f", fmt, "-O", "raw", str(image), str(raw)], check=True)
        assert raw.read_bytes() == want
        raw.unlink()
    backing = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(vdb)], check=True,
                                        capture_output=True, text=True).stdout).get("backing-filename")
    assert backing == (str(root / "disks/vdb.raw") if overlay else None)  # verify: only the image is read in place
    [xml] = runtime.hv.defined
    disks = {d.find("target").get("dev"): (d.find("source").get("file"), d.find("driver").get("type"))
             for d in ET.fromstring(xml).findall("devices/disk")}
    assert disks == {"vda": (str(vms / "web1-vda.qcow2"), "qcow2"), "vdb": (str(vdb), vdb_format)}
    copying = [t for t in runtime.progress.texts if t.startswith("copying")]
    assert copying and copying[-1].startswith("copying 100% ")  # the total counts the segments' bytes
    assert all(int(t.split()[1].rstrip("%")) <= 100 for t in copying)
    assert result.state == "shutoff" and not (runtime.state_dir / "restores").exists()


def test_a_restore_that_fails_while_reassembling_leaves_nothing(tmp_path, runtime, monkeypatch):
    root = make_archive(tmp_path, GUEST, fmt="raw", image=b"R" * 4096)
    vms = tmp_path / "vms"

    def truncate_after_the_check(name):
        if name == "restore-after-extract":
            (root / "disks/vda.segments/000001").write_bytes(b"x")

    monkeypatch.setattr(restore_mod, "failpoint", truncate_after_the_check)
    with pytest.raises(ArchiveIncomplete, match="disk vda: its segments hold 1029 of 1540 bytes"):
        restore(runtime, Source(directory=root), disk_dir=vms, start=False)
    assert not vms.exists() and runtime.hv.defined == []


class FolderTarget:
    """A target whose archive is a folder, extracted by copying (the borg and restic way: a copy to read)."""

    name = "fake"

    def __init__(self, root: Path):
        self.root = root

    def extract(self, archive, destination, paths=None):
        import shutil

        if paths is None:
            shutil.copytree(self.root, destination)
        else:
            destination.mkdir()
            for rel in paths:
                shutil.copy(self.root / rel, destination / rel)
        return destination


def test_a_restore_from_a_target_reassembles_the_extracted_segments(tmp_path, runtime):
    data = os.urandom(1024) + bytes(1024) + os.urandom(512)
    root = make_archive(tmp_path, data, fmt="raw")
    vms = tmp_path / "vms"
    restore(runtime, Source(target=FolderTarget(root), archive="a1", domain="web1"), disk_dir=vms, start=False)
    assert os.listdir(vms) == ["web1-vda.qcow2"]  # the base's name; its format is raw
    assert (vms / "web1-vda.qcow2").read_bytes() == data
    assert ET.fromstring(runtime.hv.defined[0]).find("devices/disk/driver").get("type") == "raw"
