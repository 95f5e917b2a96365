"""`virtfreeze restore` of a UEFI guest (Debian's OVMF) with an emulated TPM (swtpm), with real libvirtd:
its NVRAM and TPM state are archived and come back byte-identical, and the domain runs again."""

from __future__ import annotations

import json
import shutil
import subprocess
import uuid as uuidlib
import xml.etree.ElementTree as ET
from pathlib import Path

import libvirt
import pytest

from tests.host.helpers import sha256
from tests.host.test_restore import assert_acked_in, back_up, setup, watch
from tests.rig.guest import SOCKET_DIR, UNDEFINE_ALL, DiskSpec, Guest, domain_xml, remove_domain

OVMF_CODE = "/usr/share/OVMF/OVMF_CODE_4M.fd"
OVMF_VARS = "/usr/share/OVMF/OVMF_VARS_4M.fd"
NVRAM_DIR = Path("/var/lib/libvirt/qemu/nvram")
SWTPM_DIR = Path("/var/lib/libvirt/swtpm")
SWTPM_LOG_DIR = Path("/var/log/swtpm/libvirt/qemu")


def uefi_tpm_xml(xml: str, nvram: Path) -> str:
    """The rig's writing guest as a q35 machine booting through OVMF (its kernel still given directly),
    with NVRAM of its own and a TPM 2.0 emulated by swtpm."""
    root = ET.fromstring(xml)
    os_ = root.find("os")
    os_.find("type").set("machine", "q35")  # the rig's disks are virtio, its serials ISA: no IDE needed
    loader = ET.Element("loader", readonly="yes", type="pflash")
    loader.text = OVMF_CODE
    nvram_el = ET.Element("nvram", template=OVMF_VARS)
    nvram_el.text = str(nvram)
    os_.insert(1, loader)
    os_.insert(2, nvram_el)
    features = ET.Element("features")  # libvirt: "UEFI requires ACPI on this architecture"
    ET.SubElement(features, "acpi")
    root.insert(list(root).index(os_) + 1, features)
    tpm = ET.SubElement(root.find("devices"), "tpm", model="tpm-crb")
    ET.SubElement(tpm, "backend", type="emulator", version="2.0")
    return ET.tostring(root, encoding="unicode")


def tree_sums(top: Path) -> dict[str, str]:
    """sha256 of every regular file under `top`, by path relative to it."""
    return {str(p.relative_to(top)): sha256(p) for p in sorted(top.rglob("*")) if p.is_file()}


def remove_domain_and_state(conn: libvirt.virConnect, name: str, uid: str) -> None:
    """Destroy and undefine (with NVRAM and TPM state); then remove whatever of them is left. Never raises."""
    remove_domain(conn, uuid=uid)
    (NVRAM_DIR / f"{name}_VARS.fd").unlink(missing_ok=True)
    shutil.rmtree(SWTPM_DIR / uid, ignore_errors=True)
    (SWTPM_LOG_DIR / f"{name}-swtpm.log").unlink(missing_ok=True)


@pytest.fixture
def uefi_guest(libvirt_conn, tmp_path):
    """A running UEFI + TPM writing guest; at teardown, pass or fail, its domain, NVRAM and TPM state go."""
    uid = str(uuidlib.uuid4())
    name = f"vfu-{uid[:8]}"
    workdir = tmp_path / "guest"
    workdir.mkdir()
    SOCKET_DIR.mkdir(parents=True, exist_ok=True)
    sock = SOCKET_DIR / f"{uid[:13]}.sock"
    vda = workdir / "vda.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(vda), "16M"], check=True)
    nvram = NVRAM_DIR / f"{name}_VARS.fd"
    xml = uefi_tpm_xml(domain_xml(name, uid, workdir, [DiskSpec("vda", "qcow2")], {"vda": vda}, sock), nvram)
    g = Guest(conn=libvirt_conn, name=name, uuid=uid, workdir=workdir, disks={"vda": vda}, formats={"vda": "qcow2"},
              writing=["vda"], persistent=True, sock=sock, xml=xml)
    try:
        libvirt_conn.defineXML(xml)
        g.start()
        yield g
    finally:
        if g.watcher:
            g.watcher.close()
        remove_domain_and_state(libvirt_conn, name, uid)


def swtpm_uses(state_dir: Path) -> bool:
    """A running swtpm keeps its state in `state_dir` (`--tpmstate dir=<state_dir>/tpm2,...`)."""
    for proc in Path("/proc").iterdir():
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:  # not a process, or gone meanwhile
            continue
        if args and Path(args[0].decode()).name == "swtpm" and any(
                a.decode().startswith(f"dir={state_dir}/") for a in args):
            return True
    return False


def test_uefi_guest_with_tpm_comes_back_with_identical_nvram_and_tpm_state(uefi_guest, vf, tmp_path, libvirt_conn):
    g = uefi_guest
    nvram, tpm_dir = NVRAM_DIR / f"{g.name}_VARS.fd", SWTPM_DIR / g.uuid
    assert nvram.is_file() and (tpm_dir / "tpm2").is_dir(), "libvirt made no NVRAM or TPM state for the guest"
    env = setup(vf, tmp_path, g)
    t_before, last = back_up(vf, env, g, "--memory", "--target", "dir")
    acked = g.acked(until=t_before)

    # What the archive holds: the NVRAM as nvram.fd, the TPM state directory as tpm/.
    [archived] = [p for p in (tmp_path / "dir-target").iterdir() if not p.name.startswith(".")]
    manifest = json.loads((archived / "manifest.json").read_text())
    assert manifest["memory"] and manifest["state_at_freeze"] == "running"
    nvram_sum = sha256(archived / "nvram.fd")
    tpm_sums = tree_sums(archived / "tpm")
    assert "tpm2/tpm2-00.permall" in tpm_sums, tpm_sums
    assert nvram_sum == sha256(nvram)  # the guest's OS writes no EFI variables: the host's file is as archived
    owners = {str(p.relative_to(tpm_dir)): (p.stat().st_uid, p.stat().st_gid) for p in tpm_dir.rglob("*")}

    # A lost host: no domain, no NVRAM, no TPM state, no disks.
    g.watcher.close()
    g.dom.destroy()
    g.dom.undefineFlags(UNDEFINE_ALL)
    assert not nvram.exists() and not tpm_dir.exists()
    for p in g.disks.values():
        p.unlink()

    # Defined, not started: nothing has touched the restored files yet.
    out = json.loads(vf("--json", "restore", g.name, "--target", "dir", "--no-start", env=env).stdout)["restore"]
    assert (out["uuid"], out["new"], out["state"], out["from_memory"]) == (g.uuid, False, "shutoff", False), out
    assert {str(nvram), str(tpm_dir)} <= set(out["files"]), out["files"]
    root = ET.fromstring(libvirt_conn.lookupByName(g.name).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    assert root.findtext("os/nvram").strip() == str(nvram)
    assert root.find("devices/tpm/backend").get("type") == "emulator"
    assert sha256(nvram) == nvram_sum
    assert tree_sums(tpm_dir) == tpm_sums
    # Owned by the user swtpm runs as, as libvirt made it (it does not change an existing state's owner).
    assert {str(p.relative_to(tpm_dir)): (p.stat().st_uid, p.stat().st_gid) for p in tpm_dir.rglob("*")} == owners
    assert_acked_in(g.disks, g.formats, acked)

    # It cold-boots on exactly those files: OVMF from the restored NVRAM, swtpm on the restored state.
    g.start(boot_timeout=60)
    assert g.watcher.booted.is_set()
    assert swtpm_uses(tpm_dir), f"no swtpm runs on {tpm_dir}"
    g.watcher.close()
    g.dom.destroy()

    # Over that shut-off domain and its own files, from memory: it resumes where it was frozen, no boot.
    watcher = watch(g.sock, tmp_path / "acks-restored.log")
    try:
        out = json.loads(vf("--json", "restore", g.name, "--target", "dir", "--replace", env=env).stdout)["restore"]
        assert (out["uuid"], out["state"], out["from_memory"]) == (g.uuid, "running", True), out
        dom = libvirt_conn.lookupByName(g.name)
        assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
        watcher.wait_for(lambda acks: any(a.disk == "vda" and a.seq > last["vda"] for a in acks), 60,
                         "writes past the last record acknowledged before the freeze")
        assert not watcher.booted.is_set(), "the restored guest booted instead of resuming"
        assert swtpm_uses(tpm_dir), f"no swtpm runs on {tpm_dir}"
        # Resuming writes neither: the NVRAM and the TPM's permanent state are still the archived bytes.
        assert sha256(nvram) == nvram_sum
        assert tree_sums(tpm_dir) == tpm_sums
        dom.destroy()
    finally:
        watcher.close()
    assert_acked_in(g.disks, g.formats, acked)
