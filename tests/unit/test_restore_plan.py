"""Restore planning: an archive is data; every destination is decided and checked before writing."""

import json
import os
import random
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from virtfreeze.restore_plan import (
    ArchiveIncomplete, ArchiveRefused, plan_restore, read_archive, relocate_xml, safe_relpath,
)

UUID = "0f5a1c6e-3b7d-4c1e-9a2b-5d6e7f8a9b0c"


def domain_xml(tmp: Path, *, disk_type="file", nvram: str | None = None, loader: str | None = None) -> str:
    src = f"<source dev='/dev/loop7'/>" if disk_type == "block" else f"<source file='{tmp}/vms/web1-vda.qcow2'/>"
    fmt = "raw" if disk_type == "block" else "qcow2"
    os_extra = ""
    if loader:
        os_extra += f"<loader readonly='yes' type='pflash'>{loader}</loader>"
    if nvram:
        os_extra += f"<nvram template='/usr/share/OVMF/OVMF_VARS_4M.fd'>{nvram}</nvram>"
    return f"""<domain type='qemu'><name>web1</name><uuid>{UUID}</uuid>
  <os><type>hvm</type>{os_extra}</os>
  <devices>
    <disk type='{disk_type}' device='disk'><driver name='qemu' type='{fmt}'/>{src}<target dev='vda'/></disk>
    <interface type='network'><mac address='52:54:00:aa:bb:cc'/><source network='default'/></interface>
    <serial type='file'><source path='{tmp}/vms/web1-console.log' append='on'/><target port='0'/></serial>
  </devices></domain>"""


def make_archive(tmp: Path, *, xml: str | None = None, files: dict[str, bytes] | None = None,
                 manifest: dict | None = None, disk_type: str = "file") -> Path:
    root = tmp / "archive"
    (root / "disks").mkdir(parents=True)
    files = files if files is not None else {"disks/vda.qcow2": b"Q" * 100}
    for rel, data in files.items():
        (root / rel).write_bytes(data)
    fmt = "raw" if disk_type == "block" else "qcow2"
    base = "/dev/loop7" if disk_type == "block" else f"{tmp}/vms/web1-vda.qcow2"
    m = {"domain": "web1", "uuid": UUID, "state_at_freeze": "running", "memory": False,
         "disks": {"vda": {"base": base, "format": fmt, "type": disk_type, "file": f"disks/vda.{fmt}", "backing": []}},
         "sizes": {rel: len(data) for rel, data in files.items()}}
    m.update(manifest or {})
    (root / "manifest.json").write_text(json.dumps(m))
    (root / "domain.xml").write_text(xml or domain_xml(tmp, disk_type=disk_type))
    return root


def test_paths_from_an_archive_stay_inside_it():
    assert str(safe_relpath("disks/vda.qcow2", "disk")) == "disks/vda.qcow2"
    for bad in ("../etc/passwd", "/etc/passwd", "disks/../../x", "disks//x", "", "./x"):
        with pytest.raises(ArchiveRefused):
            safe_relpath(bad, "disk")


def test_a_symlink_or_a_path_leading_out_is_refused(tmp_path):
    root = make_archive(tmp_path)
    os.symlink("/etc/shadow", root / "disks" / "vdb.raw")
    with pytest.raises(ArchiveRefused, match="symlink"):
        read_archive(root)

    other = make_archive(tmp_path / "2", manifest={"disks": {"vda": {"file": "../../x", "format": "raw"}}})
    with pytest.raises(ArchiveRefused, match="outside itself"):
        read_archive(other)


def test_a_missing_or_truncated_disk_is_incomplete(tmp_path):
    root = make_archive(tmp_path)
    (root / "disks" / "vda.qcow2").write_bytes(b"Q" * 10)
    with pytest.raises(ArchiveIncomplete, match="10 of 100 bytes"):
        read_archive(root)
    (root / "disks" / "vda.qcow2").unlink()
    with pytest.raises(ArchiveIncomplete, match="missing"):
        read_archive(root)


def test_in_place_restores_the_archived_paths_only_where_allowed(tmp_path):
    archive = read_archive(make_archive(tmp_path))
    with pytest.raises(ArchiveRefused) as e:
        plan_restore(archive, name=None, disk_dir=None, allowed=[Path("/var/lib/libvirt")])
    assert "--disk-dir" in str(e.value) and "restore_directories" in str(e.value)

    plan = plan_restore(archive, name=None, disk_dir=None, allowed=[tmp_path / "vms"])
    assert (plan.name, plan.uuid, plan.new) == ("web1", UUID, False)
    assert plan.files() == [tmp_path / "vms" / "web1-vda.qcow2"]
    root = ET.fromstring(plan.definition)
    assert root.find("devices/interface/mac").get("address") == "52:54:00:aa:bb:cc"


def test_a_new_domain_gets_its_own_uuid_macs_and_files(tmp_path):
    archive = read_archive(make_archive(tmp_path, xml=domain_xml(tmp_path, nvram="/var/lib/libvirt/qemu/nvram/web1_VARS.fd",
                                                                 loader="/usr/share/OVMF/OVMF_CODE_4M.fd"),
                                        files={"disks/vda.qcow2": b"Q" * 100, "nvram.fd": b"N" * 10}))
    plan = plan_restore(archive, name="web1-copy", disk_dir=None, allowed=[tmp_path / "vms", Path("/var/lib/libvirt")],
                        rng=random.Random(1))
    root = ET.fromstring(plan.definition)
    assert plan.new and plan.uuid != UUID and root.findtext("uuid") == plan.uuid
    assert root.findtext("name") == "web1-copy"
    assert root.find("devices/interface/mac").get("address") not in ("52:54:00:aa:bb:cc", None)
    assert root.find("devices/disk/source").get("file") == str(tmp_path / "vms" / "web1-copy-vda.qcow2")
    assert root.find("devices/serial/source").get("path") == str(tmp_path / "vms" / "web1-copy-console.log")
    assert root.findtext("os/nvram") == "/var/lib/libvirt/qemu/nvram/web1-copy_VARS.fd"
    originals = {f"{tmp_path}/vms/web1-vda.qcow2", "/var/lib/libvirt/qemu/nvram/web1_VARS.fd"}
    assert not originals & {str(p) for p in plan.files()}
    # The memory image's XML gets the same relocation.
    mem = ET.fromstring(relocate_xml(archive.xml, plan.relocation))
    assert mem.findtext("uuid") == plan.uuid and mem.findtext("name") == "web1-copy"
    assert mem.find("devices/interface/mac").get("address") == root.find("devices/interface/mac").get("address")


def test_a_block_device_disk_comes_back_as_a_raw_file(tmp_path):
    archive = read_archive(make_archive(tmp_path, files={"disks/vda.raw": b"R" * 64}, disk_type="block"))
    plan = plan_restore(archive, name=None, disk_dir=tmp_path / "restored", allowed=[tmp_path])
    assert plan.files() == [tmp_path / "restored" / "web1-vda.raw"]
    disk = ET.fromstring(plan.definition).find("devices/disk")
    assert disk.get("type") == "file" and disk.find("driver").get("type") == "raw"
    assert disk.find("source").get("file") == str(tmp_path / "restored" / "web1-vda.raw")
    assert any("block device /dev/loop7" in w for w in plan.warnings)


def test_places_the_definition_names_outside_the_allowed_ones_are_refused(tmp_path):
    evil = domain_xml(tmp_path).replace(f"{tmp_path}/vms/web1-console.log", "/etc/cron.d/evil")
    archive = read_archive(make_archive(tmp_path, xml=evil))
    with pytest.raises(ArchiveRefused, match="/etc/cron.d/evil"):
        plan_restore(archive, name=None, disk_dir=None, allowed=[tmp_path / "vms"])

    loader = domain_xml(tmp_path, loader=f"{tmp_path}/vms/evil-firmware.fd")
    archive = read_archive(make_archive(tmp_path / "2", xml=loader))
    with pytest.raises(ArchiveRefused, match="firmware"):
        plan_restore(archive, name=None, disk_dir=None, allowed=[tmp_path / "vms", tmp_path / "2"])


def test_a_symlinked_destination_directory_is_judged_where_it_leads(tmp_path):
    (tmp_path / "vms").mkdir()
    os.symlink("/etc", tmp_path / "vms" / "escape")
    xml = domain_xml(tmp_path).replace(f"{tmp_path}/vms/web1-vda.qcow2", f"{tmp_path}/vms/escape/web1-vda.qcow2")
    archive = read_archive(make_archive(tmp_path, xml=xml,
                                        manifest={"disks": {"vda": {"base": f"{tmp_path}/vms/escape/web1-vda.qcow2",
                                                                    "format": "qcow2", "type": "file",
                                                                    "file": "disks/vda.qcow2", "backing": []}}}))
    with pytest.raises(ArchiveRefused, match="outside the allowed places"):
        plan_restore(archive, name=None, disk_dir=None, allowed=[tmp_path / "vms"])


def test_a_verify_is_isolated_and_reads_disks_through_overlays(tmp_path):
    xml = domain_xml(tmp_path).replace("</devices>", "<hostdev mode='subsystem' type='pci'/>"
                                       "<graphics type='vnc' port='5901' autoport='no'/></devices>")
    archive = read_archive(make_archive(tmp_path, xml=xml))
    scratch = tmp_path / "scratch"
    plan = plan_restore(archive, name="verify-web1-abc123", disk_dir=scratch, allowed=[tmp_path / "vms", scratch],
                        isolate="cold", file_dir=scratch, overlay=True)
    root = ET.fromstring(plan.definition)
    assert root.findall("devices/interface") == [] and root.findall("devices/hostdev") == []
    assert root.find("devices/graphics").get("autoport") == "yes" and root.find("devices/graphics").get("port") is None
    [p] = plan.placements
    assert (p.kind, p.format, p.dest.parent, p.backing_dest) == ("overlay", "qcow2", scratch,
                                                                 archive.root / "disks" / "vda.qcow2")
    disk = root.find("devices/disk")
    assert disk.find("driver").get("type") == "qcow2" and disk.find("source").get("file") == str(p.dest)
    assert root.find("devices/serial/source").get("path") == str(scratch / "verify-web1-abc123-console.log")

    # Resumed from memory, the NICs stay (the memory state has them): their links go down at start.
    plan = plan_restore(archive, name="verify-web1-abc123", disk_dir=scratch, allowed=[tmp_path / "vms", scratch],
                        isolate="memory", file_dir=scratch, overlay=True)
    assert len(ET.fromstring(plan.definition).findall("devices/interface")) == 1


def test_a_medium_outside_the_allowed_places_is_ejected_and_a_kernel_there_refused(tmp_path):
    xml = domain_xml(tmp_path).replace("</devices>", "<disk type='file' device='cdrom'><source file='/srv/iso/x.iso'/>"
                                       "<target dev='hdc'/><readonly/></disk></devices>")
    plan = plan_restore(read_archive(make_archive(tmp_path, xml=xml)), name=None, disk_dir=None,
                        allowed=[tmp_path / "vms"])
    cdrom = [d for d in ET.fromstring(plan.definition).findall("devices/disk") if d.get("device") == "cdrom"][0]
    assert cdrom.find("source") is None and any("hdc: /srv/iso/x.iso" in w for w in plan.warnings)

    xml = domain_xml(tmp_path).replace("<type>hvm</type>", "<type>hvm</type><kernel>/etc/shadow</kernel>")
    with pytest.raises(ArchiveRefused, match="<kernel>"):
        plan_restore(read_archive(make_archive(tmp_path / "2", xml=xml)), name=None, disk_dir=None,
                     allowed=[tmp_path])


@pytest.mark.parametrize("evil, match", [
    ("<devices><emulator>/tmp/evil</emulator>", "emulator"),
    ("<devices><filesystem type='mount'><source dir='/'/><target dir='host'/></filesystem>", "filesystem"),
    ("<devices><graphics type='vnc' socket='/etc/cron.d/vnc'/>", "socket"),
    ("<devices><disk type='dir' device='disk'><source dir='/root'/><target dev='vdz'/></disk>", "type 'dir'"),
])
def test_a_definition_may_not_give_the_domain_host_access(tmp_path, evil, match):
    xml = domain_xml(tmp_path).replace("<devices>", evil, 1)
    with pytest.raises(ArchiveRefused, match=match):
        plan_restore(read_archive(make_archive(tmp_path, xml=xml)), name=None, disk_dir=None, allowed=[tmp_path])
    ns = domain_xml(tmp_path).replace("<domain type='qemu'>", "<domain type='qemu' xmlns:qemu="
                                      "'http://libvirt.org/schemas/domain/qemu/1.0'>").replace(
        "</devices>", "</devices><qemu:commandline><qemu:arg value='-drive'/></qemu:commandline>")
    with pytest.raises(ArchiveRefused, match="another namespace"):
        plan_restore(read_archive(make_archive(tmp_path / "ns", xml=ns)), name=None, disk_dir=None,
                     allowed=[tmp_path])


def test_a_new_domain_leaves_out_the_disks_the_archive_lacks(tmp_path):
    xml = domain_xml(tmp_path).replace("</devices>", "<disk type='block' device='disk'><source dev='/dev/vg/scratch'/>"
                                       "<target dev='vdz'/></disk></devices>")
    plan = plan_restore(read_archive(make_archive(tmp_path, xml=xml)), name="web1-copy", disk_dir=None,
                        allowed=[tmp_path])
    targets = [d.find("target").get("dev") for d in ET.fromstring(plan.definition).findall("devices/disk")]
    assert targets == ["vda"] and any("vdz is not in the archive" in w for w in plan.warnings)
