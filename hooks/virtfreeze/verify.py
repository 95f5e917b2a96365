"""Verify: an archive restored as an isolated throwaway domain that must run, then removed.

The archive is restored (restore.py) under a new name, `verify-<domain>-<id>`,
with a new UUID and MACs, into a scratch directory on disk; its NICs are
removed (a cold boot) or their links taken down before it runs (resumed from
memory), and host devices and shared directories are dropped. Where the
target keeps the archive as plain files (the directory target, `--from`),
the disks are qcow2 overlays over the archived images: read in place, not
copied (a disk archived as segments is reassembled into the scratch directory). The domain must then stay running for the window without crashing,
pausing on an I/O error or shutting off; its guest agent, where it has a
channel, must answer a ping; a `--check-command` must exit 0. Whatever the
outcome the domain and the scratch directory go (unless kept on failure).
A record per verify lets the next virtfreeze command remove what a killed
verify left.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import libvirt

from virtfreeze import file_removal, holders, runner
from virtfreeze.domain_xml import has_agent_channel
from virtfreeze.errors import VirtfreezeError
from virtfreeze.journal import failpoint, write_atomic
from virtfreeze.logs import domain_log
from virtfreeze.model import DomainRef
from virtfreeze.plugins import report_failure, tell
from virtfreeze.restore import Source, recover as recover_restore, restore
from virtfreeze.restore_plan import read_archive
from virtfreeze.runtime import Runtime
from virtfreeze.signals import stopping

log = logging.getLogger(__name__)

AGENT_TIMEOUT = 10  # seconds the guest agent has to answer its ping


class VerifyFailed(VirtfreezeError):
    """The archive restored, but the domain did not run as it must (or a check said no)."""


@dataclass
class VerifyResult:
    domain: str  # the archived domain
    source: str  # target:archive, or the directory
    verify_domain: str  # the throwaway domain's name
    ok: bool
    how: str  # "resumed from memory" or "cold boot"
    network: str  # what was done to its network interfaces
    checks: list[str] = field(default_factory=list)  # what was checked and passed
    error: str | None = None
    seconds: float = 0.0  # the whole verify
    restore_seconds: float = 0.0  # the restore inside it
    kept: str | None = None  # where a failed verify's domain and files were kept (--keep-on-failure)

    def to_json(self) -> dict:
        return dict(self.__dict__)


def _records_dir(rt: Runtime) -> Path:
    return rt.state_dir / "verify"


def _record_path(rt: Runtime, name: str) -> Path:
    return _records_dir(rt) / f"{name}.json"


def clean_leftovers(rt: Runtime) -> list[str]:
    """Remove what verifies whose process is gone left behind (a SIGKILL, a crash): their domain,
    NVRAM, TPM state and scratch directory. Cheap when there is nothing: one directory listing."""
    directory = _records_dir(rt)
    if not directory.is_dir():
        return []
    cleaned = []
    for path in sorted(directory.glob("*.json")):
        try:
            data = json.loads(path.read_text())
            if _alive_process(data["pid"], data["started"]):
                continue  # a verify in progress (this process's own, or another's)
        except (OSError, ValueError, KeyError, TypeError):
            continue
        domain_log(log, data.get("domain", "?")).warning("removing what an interrupted verify left: %s", data["name"])
        try:
            _remove(rt, data["name"], Path(data["scratch"]))
        except (VirtfreezeError, OSError) as e:  # never the reason another command fails
            domain_log(log, data.get("domain", "?")).warning("could not remove %s yet: %s", data["name"], e)
            continue
        path.unlink(missing_ok=True)
        cleaned.append(data["name"])
    return cleaned


def _alive_process(pid: int | None, started: int | None) -> bool:
    return bool(pid) and holders.start_time(pid) == started


def _remove(rt: Runtime, name: str, scratch: Path) -> None:
    """The verify domain (destroyed, undefined with its NVRAM and TPM state) and its scratch directory."""
    with contextlib.suppress(VirtfreezeError):
        recover_restore(rt, name)  # a restore killed half-way: its own record knows its files
    info = rt.hv.info_by_name(name)
    if info is not None:
        with contextlib.suppress(VirtfreezeError):
            rt.hv.destroy(info.uuid, name)
        rt.hv.undefine(info.uuid, name, nvram=True, tpm=True)
    file_removal.remove_tree(scratch)  # its disks in steps: the original runs on beside it


def _watch(rt: Runtime, uuid: str, name: str, seconds: float) -> str | None:
    """Wait `seconds` for the domain to misbehave; the reason when it did, None when it ran throughout."""
    trouble: list[str] = []
    event = threading.Event()

    def on_event(kind: str, detail: int) -> None:
        if kind in ("stopped", "shutdown", "crashed"):
            trouble.append(f"it {'shut down' if kind == 'shutdown' else kind}")
        elif kind == "suspended" and detail == libvirt.VIR_DOMAIN_EVENT_SUSPENDED_IOERROR:
            trouble.append("it paused on an I/O error")
        elif kind == "suspended":
            trouble.append("it was paused")
        else:
            return
        event.set()

    deadline = time.monotonic() + seconds
    with rt.hv.on_lifecycle(uuid, on_event):
        info = rt.hv.info(uuid)
        if info is None or info.state != "running":
            return f"it is {info.state if info else 'gone'}, not running"
        while not event.wait(min(0.5, max(0.0, deadline - time.monotonic()))):  # 0.5 s: to notice SIGTERM
            if stopping.is_set():
                return "virtfreeze was asked to stop"
            if time.monotonic() >= deadline:
                break
    if trouble:
        return trouble[0]
    info = rt.hv.info(uuid)
    return None if info is not None and info.state == "running" else f"it is {info.state if info else 'gone'}"


def verify(rt: Runtime, source: Source, *, seconds: float = 30.0, check_command: list[str] | None = None,
           keep_on_failure: bool = False) -> VerifyResult:
    """Verify one archive; the result says whether it ran. Raises only for bad input (exit 2)."""
    t0 = time.monotonic()
    try:
        domain = source.domain or read_archive(source.directory, data=False).name
    except VirtfreezeError as e:  # an archive this bad is a failed verify, not the end of the run
        return VerifyResult(source.domain or str(source.directory), source.describe(), "-", False, "-", "-",
                            error=str(e), seconds=time.monotonic() - t0)
    name = f"verify-{domain[:80]}-{secrets.token_hex(3)}"
    scratch = (rt.config.verify_directory or rt.state_dir / "verify") / name
    record = _record_path(rt, name)
    record.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_atomic(record, json.dumps({"name": name, "domain": domain, "scratch": str(scratch), "pid": os.getpid(),
                                     "started": holders.start_time(os.getpid())}).encode())
    result = VerifyResult(domain, source.describe(), name, False, "?", "none")
    dlog = domain_log(log, domain)
    kept = False
    uuid = ""
    try:
        local = source.target.in_place(source.archive) if source.target is not None else None
        read_from = Source(directory=local, domain=source.domain) if local is not None else source
        scratch.mkdir(parents=True, mode=0o700)
        t_restore = time.monotonic()
        restored = restore(rt, read_from, name=name, disk_dir=scratch, start=True, isolate=True, file_dir=scratch,
                           overlay=local is not None or source.directory is not None)
        result.restore_seconds = time.monotonic() - t_restore
        uuid = restored.uuid
        result.how = "resumed from memory" if restored.from_memory else "cold boot"
        result.network = _network(rt, restored.uuid, name, restored.from_memory)
        result.checks.append("qemu-img check of every qcow2")
        failpoint("verify-running")
        problem = _watch(rt, restored.uuid, name, seconds)
        if problem:
            raise VerifyFailed(f"{problem} within {seconds:g}s of starting ({result.how})", domain=domain)
        result.checks.append(f"ran {seconds:g}s ({result.how})")
        if has_agent_channel(rt.hv.xml(restored.uuid, name)):
            try:
                rt.hv.agent_ping(restored.uuid, name, AGENT_TIMEOUT)
            except VirtfreezeError as e:
                raise VerifyFailed(f"its guest agent did not answer a ping: {e.message}", domain=domain) from None
            result.checks.append("guest agent answered a ping")
        if check_command:
            env = dict(os.environ, VIRTFREEZE_VERIFY_DOMAIN=name, VIRTFREEZE_VERIFY_ORIGINAL=domain,
                       VIRTFREEZE_VERIFY_SOURCE=result.source)
            proc = runner.run(check_command, what="check command", domain=domain, ok=tuple(range(256)), env=env)
            if proc.returncode != 0:
                tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-1:] or [""]
                raise VerifyFailed(f"--check-command exited {proc.returncode}" + (f": {tail[0]}" if tail[0] else ""),
                                   domain=domain)
            result.checks.append("check command exited 0")
        problem = _watch(rt, restored.uuid, name, 0)
        if problem:
            raise VerifyFailed(f"{problem} after its checks", domain=domain)
        result.ok = True
    except (VirtfreezeError, OSError) as e:
        if isinstance(e, OSError):
            e = VirtfreezeError(f"{e.strerror or e}", domain=domain, path=e.filename)
        result.error = str(e)  # a refused or damaged archive too: it did not verify
        report_failure(rt.pm, DomainRef(domain, uuid), "verify", e)
        if keep_on_failure and rt.hv.info_by_name(name) is not None:
            result.kept = f"domain {name}, files in {scratch}"
            kept = True
            dlog.error("verify of %s failed: %s; kept for inspection: %s", result.source, e, result.kept)
    finally:
        if not kept:
            _remove(rt, name, scratch)
        record.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            record.parent.rmdir()
        result.seconds = time.monotonic() - t0
    if result.ok:  # the throwaway domain is gone, the figures are final
        tell(rt.pm, "virtfreeze_verified", domain, domain=domain, result=result)
    return result


def _network(rt: Runtime, uuid: str, name: str, from_memory: bool) -> str:
    """What isolates it from the network, in words (the restore did it)."""
    ifaces = ET.fromstring(rt.hv.xml(uuid, name)).findall("devices/interface")
    if from_memory and ifaces:
        return f"{len(ifaces)} interface(s), links down"
    return "interfaces removed" if not from_memory else "no interfaces"
