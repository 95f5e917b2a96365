"""Disk parsing, eligibility, overlay naming, snapshot XML and re-pointing."""

import xml.etree.ElementTree as ET
from pathlib import Path

from virtfreeze.domain_xml import (
    BaseImage, has_agent_channel, ineligible_reason, is_overlay, nvram_path, overlay_path, parse_disks,
    repoint_disks, snapshot_xml,
)

LIVE = """<domain type='qemu'><name>web</name><os><nvram>/var/lib/libvirt/qemu/nvram/web_VARS.fd</nvram></os>
<devices>
  <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
    <source file='/img/web.qcow2.virtfreeze.qcow2' index='3'/>
    <backingStore type='file' index='2'><format type='qcow2'/><source file='/img/web.qcow2'/>
      <backingStore type='file' index='1'><format type='qcow2'/><source file='/img/template.qcow2'/>
        <backingStore/></backingStore></backingStore>
    <target dev='vda' bus='virtio'/></disk>
  <disk type='block' device='disk'><driver name='qemu' type='raw'/><source dev='/dev/vg/data'/>
    <target dev='vdb' bus='virtio'/></disk>
  <disk type='network' device='disk'><driver name='qemu' type='raw'/><source protocol='nbd' name='x'/>
    <target dev='vdc' bus='virtio'/></disk>
  <disk type='file' device='cdrom'><source file='/iso/x.iso'/><target dev='hdc' bus='ide'/><readonly/></disk>
  <disk type='file' device='disk'><source file='/img/shared.raw'/><target dev='vdd'/><shareable/></disk>
  <disk type='file' device='disk'><source file='/img/ro.raw'/><target dev='vde'/><readonly/></disk>
  <disk type='file' device='disk' snapshot='no'><source file='/img/scratch.raw'/><target dev='vdf'/></disk>
  <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
</devices></domain>"""


def test_parse_disks_reads_sources_and_chain():
    disks = {d.target: d for d in parse_disks(LIVE)}
    assert disks["vda"].source == "/img/web.qcow2.virtfreeze.qcow2"
    assert disks["vda"].backing == [("/img/web.qcow2", "qcow2"), ("/img/template.qcow2", "qcow2")]
    assert disks["vdb"].type == "block" and disks["vdb"].source == "/dev/vg/data"
    assert disks["vdc"].source is None


def test_eligibility_reasons():
    disks = {d.target: d for d in parse_disks(LIVE)}
    assert ineligible_reason(disks["vda"]) is None
    assert ineligible_reason(disks["vdb"]) is None
    assert ineligible_reason(disks["vdb"], {"vdb"}) == "excluded by configuration"
    assert "network" in ineligible_reason(disks["vdc"])
    assert "cdrom" in ineligible_reason(disks["hdc"])
    assert "shareable" in ineligible_reason(disks["vdd"])
    assert ineligible_reason(disks["vde"]) == "read-only"
    assert "snapshot='no'" in ineligible_reason(disks["vdf"])


def test_overlay_names_are_recognisable():
    disks = {d.target: d for d in parse_disks(LIVE)}
    beside = overlay_path(disks["vdb"], "u-1", None, Path("/state"))
    assert beside == Path("/state/overlays/u-1.vdb.virtfreeze.qcow2")  # never beside a block device
    vda = parse_disks(LIVE)[0]
    vda.source = "/img/web.qcow2"
    assert overlay_path(vda, "u-1", None, Path("/s")) == Path("/img/web.qcow2.virtfreeze.qcow2")
    assert overlay_path(vda, "u-1", Path("/ov"), Path("/s")) == Path("/ov/u-1.vda.virtfreeze.qcow2")
    assert is_overlay("/img/web.qcow2.virtfreeze.qcow2") and is_overlay("/x/a.virtfreeze-2.qcow2")
    assert not is_overlay("/img/web.qcow2") and not is_overlay(None)


def test_snapshot_xml_lists_every_disk():
    disks = parse_disks(LIVE)
    root = ET.fromstring(snapshot_xml(disks, {"vda": Path("/o/a.virtfreeze.qcow2")}))
    assert root.find("memory").get("snapshot") == "no"
    by = {d.get("name"): d for d in root.findall("disks/disk")}
    assert set(by) == {d.target for d in disks}
    assert by["vda"].get("snapshot") == "external" and by["vda"].find("source").get("file") == "/o/a.virtfreeze.qcow2"
    assert all(by[t].get("snapshot") == "no" for t in by if t != "vda")
    mem = ET.fromstring(snapshot_xml(disks, {}, Path("/m/memory.save"))).find("memory")
    assert mem.get("snapshot") == "external" and mem.get("file") == "/m/memory.save"


def test_repoint_only_touches_disks_on_their_overlay():
    bases = {"vda": BaseImage("/img/web.qcow2", "qcow2"), "vdb": BaseImage("/dev/vg/data", "raw", "block")}
    xml, changed = repoint_disks(LIVE, bases, only_if_source={"vda": "/img/web.qcow2.virtfreeze.qcow2",
                                                             "vdb": "/elsewhere.qcow2"})
    assert changed == ["vda"]
    vda = parse_disks(xml)[0]
    assert vda.source == "/img/web.qcow2" and vda.format == "qcow2" and vda.backing == []
    again, changed = repoint_disks(xml, bases)
    assert changed == []  # already on base: idempotent


def test_repoint_to_a_block_device():
    overlay = LIVE.replace("<source dev='/dev/vg/data'/>", "").replace(
        "<disk type='block' device='disk'><driver name='qemu' type='raw'/>",
        "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/s/u.vdb.virtfreeze.qcow2'/>")
    xml, changed = repoint_disks(overlay, {"vdb": BaseImage("/dev/vg/data", "raw", "block")})
    assert changed == ["vdb"]
    vdb = {d.target: d for d in parse_disks(xml)}["vdb"]
    assert (vdb.type, vdb.source, vdb.format) == ("block", "/dev/vg/data", "raw")


def test_agent_and_nvram():
    assert has_agent_channel(LIVE)
    assert not has_agent_channel("<domain><devices/></domain>")
    assert nvram_path(LIVE) == "/var/lib/libvirt/qemu/nvram/web_VARS.fd"


def test_disk_plan_recognises_its_rounds():
    from virtfreeze.model import DiskPlan

    d = DiskPlan("vda", "/img/a.qcow2", "qcow2", "file", "/img/a.qcow2.virtfreeze.qcow2")
    assert d.round_overlay(1) == d.overlay
    assert d.round_overlay(3) == "/img/a.qcow2.virtfreeze-3.qcow2"
    assert d.is_ours(d.overlay) and d.is_ours(d.round_overlay(12))
    assert not d.is_ours("/img/a.qcow2") and not d.is_ours("/img/b.qcow2.virtfreeze-2.qcow2")
    assert not d.is_ours("/img/a.qcow2.virtfreeze-x.qcow2") and not d.is_ours(None)
    assert DiskPlan.from_json(d.to_json()) == d
