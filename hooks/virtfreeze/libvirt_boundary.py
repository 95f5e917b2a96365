"""The one place that talks to libvirt.

Everything else sees `Hypervisor`: domains by UUID, XML in and out, snapshots,
block jobs and their events. libvirt errors leave this module as
VirtfreezeErrors that carry the domain, disk and path.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Callable, Iterator

import libvirt

from virtfreeze.errors import CommitNotReady, ConnectionFailed, DomainNotFound, MergeRefused, VirtfreezeError
from virtfreeze.signals import signals_to_main_thread
from virtfreeze.thread_names import name_this_thread

log = logging.getLogger(__name__)

# Domain states, as plain strings for the rest of the program.
RUNNING, PAUSED, SHUTOFF, MISSING, OTHER = "running", "paused", "shutoff", "missing", "other"
_STATES = {
    libvirt.VIR_DOMAIN_RUNNING: RUNNING,
    libvirt.VIR_DOMAIN_BLOCKED: RUNNING,
    libvirt.VIR_DOMAIN_PAUSED: PAUSED,
    libvirt.VIR_DOMAIN_SHUTOFF: SHUTOFF,
    libvirt.VIR_DOMAIN_SHUTDOWN: RUNNING,  # shutting down: still running for block jobs
    libvirt.VIR_DOMAIN_CRASHED: OTHER,
    libvirt.VIR_DOMAIN_PMSUSPENDED: OTHER,
}

_EVENTS = {
    libvirt.VIR_DOMAIN_EVENT_DEFINED: "defined", libvirt.VIR_DOMAIN_EVENT_UNDEFINED: "undefined",
    libvirt.VIR_DOMAIN_EVENT_STARTED: "started", libvirt.VIR_DOMAIN_EVENT_SUSPENDED: "suspended",
    libvirt.VIR_DOMAIN_EVENT_RESUMED: "resumed", libvirt.VIR_DOMAIN_EVENT_STOPPED: "stopped",
    libvirt.VIR_DOMAIN_EVENT_SHUTDOWN: "shutdown", libvirt.VIR_DOMAIN_EVENT_PMSUSPENDED: "pmsuspended",
    libvirt.VIR_DOMAIN_EVENT_CRASHED: "crashed",
}

# Block job events (BLOCK_JOB_2 reports the disk target).
JOB_COMPLETED = libvirt.VIR_DOMAIN_BLOCK_JOB_COMPLETED
JOB_FAILED = libvirt.VIR_DOMAIN_BLOCK_JOB_FAILED
JOB_CANCELED = libvirt.VIR_DOMAIN_BLOCK_JOB_CANCELED
JOB_READY = libvirt.VIR_DOMAIN_BLOCK_JOB_READY
JOB_TYPE_ACTIVE_COMMIT = libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_ACTIVE_COMMIT
JOB_TYPE_COMMIT = libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_COMMIT

_loop_lock = threading.Lock()
_loop_started = False


def _ensure_event_loop() -> None:
    """libvirt delivers events only with an event loop running; start it once."""
    global _loop_started
    with _loop_lock:
        if _loop_started:
            return
        libvirt.virEventRegisterDefaultImpl()

        def run() -> None:
            name_this_thread("vf-libvirt-ev")
            signals_to_main_thread()
            while True:
                libvirt.virEventRunDefaultImpl()

        threading.Thread(target=run, name="libvirt-events", daemon=True).start()
        _loop_started = True


def _silence_default_error_handler() -> None:
    # libvirt prints every error to stderr by default; we report them ourselves.
    libvirt.registerErrorHandler(lambda ctx, err: None, None)


@dataclass(frozen=True)
class DomainInfo:
    name: str
    uuid: str
    state: str
    persistent: bool
    io_error: bool = False  # paused because a disk write failed (e.g. its overlay's filesystem is full)


class Hypervisor:
    """A libvirt connection with the operations virtfreeze needs."""

    def __init__(self, uri: str, reconnect_timeout: float = 60.0):
        _ensure_event_loop()
        _silence_default_error_handler()
        self.uri = uri
        self.reconnect_timeout = reconnect_timeout
        self._lock = threading.Lock()  # the watchers table (the event thread reads it)
        self._reconnecting = threading.Lock()  # one reconnect at a time; worker threads share the connection
        self._watchers: dict[str, list[queue.Queue]] = {}
        self._lifecycle_watchers: dict[str, list[Callable[[str, int], None]]] = {}
        self.generation = 0  # bumped on every reconnect: events in between were lost
        self._conn = self._open()

    # -- connection --------------------------------------------------------
    def _open(self) -> libvirt.virConnect:
        try:
            conn = libvirt.open(self.uri)
        except libvirt.libvirtError as e:
            msg = e.get_error_message() or str(e)
            hint = "is libvirtd running? check --connect"
            if os.geteuid() != 0 or e.get_error_code() in (libvirt.VIR_ERR_AUTH_FAILED,
                                                           libvirt.VIR_ERR_AUTH_CANCELLED):
                hint = "run as root, or as a user libvirt allows (e.g. group libvirt)"
            raise ConnectionFailed(f"cannot connect to libvirt at {self.uri}: {msg}", hint=hint) from None
        with contextlib.suppress(libvirt.libvirtError):
            conn.setKeepAlive(5, 3)
        conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_BLOCK_JOB_2, self._on_block_job, None)
        conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle, None)
        return conn

    def _on_lifecycle(self, conn, dom, event, detail, opaque) -> None:
        with self._lock:
            watchers = list(self._lifecycle_watchers.get(dom.UUIDString(), []))
        for callback in watchers:
            callback(_EVENTS.get(event, str(event)), detail)

    def on_io_error(self, uuid: str, callback: Callable[[], None]) -> contextlib.AbstractContextManager:
        """Call `callback` (from libvirt's event thread) if the domain pauses on an I/O error meanwhile."""
        def on_event(event: str, detail: int) -> None:
            if event == "suspended" and detail == libvirt.VIR_DOMAIN_EVENT_SUSPENDED_IOERROR:
                callback()

        return self.on_lifecycle(uuid, on_event)

    @contextlib.contextmanager
    def on_lifecycle(self, uuid: str, callback: Callable[[str, int], None]) -> Iterator[None]:
        """Call `callback(event, detail)` (from libvirt's event thread) on each lifecycle event of the domain
        meanwhile; `event` is one of started, suspended, resumed, stopped, shutdown, crashed, ..."""
        with self._lock:
            self._lifecycle_watchers.setdefault(uuid, []).append(callback)
        try:
            yield
        finally:
            with self._lock:
                self._lifecycle_watchers[uuid].remove(callback)

    def agent_ping(self, uuid: str, name: str, timeout: int) -> None:
        """Ask the guest agent for a ping; raise when it does not answer within `timeout` seconds."""
        import libvirt_qemu

        self._call("ping the guest agent", lambda c: libvirt_qemu.qemuAgentCommand(
            c.lookupByUUIDString(uuid), '{"execute": "guest-ping"}', timeout, 0), domain=name)

    def _on_block_job(self, conn, dom, disk, job_type, status, opaque) -> None:
        uuid = dom.UUIDString()
        with self._lock:
            for q in self._watchers.get(uuid, []):
                q.put((disk, job_type, status))

    def alive(self) -> bool:
        try:
            return bool(self._conn.isAlive())
        except libvirt.libvirtError:
            return False

    def reconnect(self, seen_generation: int | None = None) -> None:
        """Open a new connection (libvirtd restarted), waiting a bounded time for it.

        Thread-safe: a caller that saw `seen_generation` and finds that another
        thread reconnected meanwhile uses that connection instead.
        """
        seen = self.generation if seen_generation is None else seen_generation
        with self._reconnecting:
            if self.generation != seen and self.alive():
                return
            with contextlib.suppress(libvirt.libvirtError):
                self._conn.close()
            deadline = time.monotonic() + self.reconnect_timeout
            delay = 0.2
            while True:
                try:
                    self._conn = self._open()
                    self.generation += 1
                    log.warning("reconnected to libvirt at %s", self.uri)
                    return
                except ConnectionFailed:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(delay)  # libvirtd is not back yet: nothing to wait on but time
                    delay = min(delay * 2, 5.0)

    # -- calls and errors ------------------------------------------------------
    def _call(self, what: str, op: Callable[[libvirt.virConnect], object], *, read_only: bool = False,
              domain: str | None = None, disk: str | None = None, path: str | None = None):
        """Run op(connection). If libvirtd went away, reconnect; read-only calls are
        then retried once, mutating ones raise (their callers re-read the state)."""
        seen = self.generation
        try:
            return op(self._conn)
        except libvirt.libvirtError as e:
            if self.alive():
                raise self._error(what, e, domain=domain, disk=disk, path=path) from None
            log.warning("lost the connection to libvirt at %s during %s; reconnecting", self.uri, what)
            self.reconnect(seen)
            if not read_only:
                raise self._error(what, e, domain=domain, disk=disk, path=path) from None
        try:
            return op(self._conn)
        except libvirt.libvirtError as e:
            raise self._error(what, e, domain=domain, disk=disk, path=path) from None

    @staticmethod
    def _error(what: str, e: libvirt.libvirtError, **where) -> VirtfreezeError:
        msg = (e.get_error_message() or str(e)).strip()
        code = e.get_error_code()
        if code == libvirt.VIR_ERR_NO_DOMAIN:
            return DomainNotFound(f"{what}: no such domain", **where)
        hint = None
        if "Permission denied" in msg and "apparmor" in msg.lower():
            hint = "AppArmor refused QEMU access; the offline merge still works"
        err = VirtfreezeError(f"{what}: {msg}", hint=hint, **where)
        err.libvirt_code = code  # type: ignore[attr-defined]
        return err

    # -- domains -------------------------------------------------------------
    @staticmethod
    def _info(d: libvirt.virDomain) -> DomainInfo:
        state, reason = d.state()
        return DomainInfo(d.name(), d.UUIDString(), _STATES.get(state, OTHER), bool(d.isPersistent()),
                          state == libvirt.VIR_DOMAIN_PAUSED and reason == libvirt.VIR_DOMAIN_PAUSED_IOERROR)

    def domains(self) -> list[DomainInfo]:
        def op(conn):
            out = []
            for d in conn.listAllDomains(0):
                with contextlib.suppress(libvirt.libvirtError):  # vanished meanwhile
                    out.append(self._info(d))
            return out

        return self._call("list domains", op, read_only=True)

    def _lookup_info(self, lookup: Callable[[libvirt.virConnect], libvirt.virDomain], key: str) -> DomainInfo | None:
        """DomainInfo of the domain `lookup` finds, or None when there is none."""
        def op(conn):
            try:
                return self._info(lookup(conn))
            except libvirt.libvirtError as e:
                if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    return None
                raise

        return self._call("look up domain", op, read_only=True, domain=key)

    def info(self, uuid: str) -> DomainInfo | None:
        return self._lookup_info(lambda c: c.lookupByUUIDString(uuid), uuid)

    def state(self, uuid: str) -> str:
        info = self.info(uuid)
        return info.state if info else MISSING

    def xml(self, uuid: str, name: str, inactive: bool = False) -> str:
        flags = libvirt.VIR_DOMAIN_XML_SECURE | (libvirt.VIR_DOMAIN_XML_INACTIVE if inactive else 0)
        return self._call("read definition", lambda c: c.lookupByUUIDString(uuid).XMLDesc(flags),
                          read_only=True, domain=name)

    def define(self, xml: str, name: str) -> None:
        self._call("redefine domain", lambda c: c.defineXML(xml), domain=name)

    def info_by_name(self, name: str) -> DomainInfo | None:
        return self._lookup_info(lambda c: c.lookupByName(name), name)

    def undefine(self, uuid: str, name: str, *, nvram: bool = False, tpm: bool = False) -> None:
        """Remove a shut-off domain's definition (with `nvram`/`tpm`, its NVRAM file and TPM state
        too; never its disks)."""
        flags = (libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
                 | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
                 | (libvirt.VIR_DOMAIN_UNDEFINE_NVRAM if nvram else libvirt.VIR_DOMAIN_UNDEFINE_KEEP_NVRAM))
        if tpm:
            flags |= getattr(libvirt, "VIR_DOMAIN_UNDEFINE_TPM", 0)
        self._call("undefine domain", lambda c: c.lookupByUUIDString(uuid).undefineFlags(flags), domain=name)

    def destroy(self, uuid: str, name: str) -> None:
        self._call("stop domain", lambda c: c.lookupByUUIDString(uuid).destroy(), domain=name)

    def restore_image(self, path: str, name: str, *, paused: bool) -> None:
        """Resume a domain from a saved memory image, as the XML inside the image says (no other XML:
        libvirt would check it against the image's and refuse a new UUID or MAC)."""
        flags = libvirt.VIR_DOMAIN_SAVE_PAUSED if paused else libvirt.VIR_DOMAIN_SAVE_RUNNING
        self._call("restore domain from memory", lambda c: c.restoreFlags(path, None, flags), domain=name,
                   path=path)

    def set_links_down(self, uuid: str, name: str) -> int:
        """Take every network interface's link down in the running domain; return how many.

        After a restore from memory QEMU infers the link state from the migrated device state,
        so a `<link state='down'/>` in the restored XML is not enough: libvirt must tell QEMU."""
        def op(conn):
            dom = conn.lookupByUUIDString(uuid)
            ifaces = ET.fromstring(dom.XMLDesc(0)).findall("devices/interface")
            for iface in ifaces:
                for link in iface.findall("link"):
                    iface.remove(link)
                if iface.find("mac") is None:
                    continue
                for state in ("up", "down"):  # libvirt skips QEMU when it believes the state is already set
                    ET.SubElement(iface, "link", state=state)
                    dom.updateDeviceFlags(ET.tostring(iface, encoding="unicode"), libvirt.VIR_DOMAIN_AFFECT_LIVE)
                    iface.remove(iface.find("link"))
            return len(ifaces)

        return self._call("set network links down", op, domain=name)

    def versions(self) -> tuple[str, str]:
        """(libvirt's version, the hypervisor's (QEMU's) version) as dotted strings."""
        def dotted(n: int) -> str:
            return f"{n // 1000000}.{n // 1000 % 1000}.{n % 1000}"

        return self._call("read versions", lambda c: (dotted(c.getLibVersion()), dotted(c.getVersion())),
                          read_only=True)

    def security_model(self) -> str | None:
        """The security driver libvirt confines QEMU with (apparmor, selinux, ...), or None."""
        caps = self._call("read capabilities", lambda c: c.getCapabilities(), read_only=True)
        models = [m.text for m in ET.fromstring(caps).findall("host/secmodel/model") if m.text and m.text != "none"]
        return models[0] if models else None

    def pool_directories(self) -> list[str]:
        """The target directories of the storage pools that have one (dir, fs, netfs, ...)."""
        def op(conn):
            out = []
            for pool in conn.listAllStoragePools(0):
                with contextlib.suppress(libvirt.libvirtError):
                    path = ET.fromstring(pool.XMLDesc(0)).findtext("target/path")
                    if path and path.startswith("/") and not path.startswith("/dev"):
                        out.append(path)
            return out

        return self._call("list storage pools", op, read_only=True)

    # -- lifecycle -------------------------------------------------------------
    def managed_save(self, uuid: str, name: str, paused: bool) -> None:
        """Save the guest's state (libvirt keeps the file) and stop it; `create` restores it."""
        flags = libvirt.VIR_DOMAIN_SAVE_PAUSED if paused else libvirt.VIR_DOMAIN_SAVE_RUNNING
        self._call("managed save", lambda c: c.lookupByUUIDString(uuid).managedSave(flags), domain=name)

    def has_managed_save(self, uuid: str, name: str) -> bool:
        return bool(self._call("read managed save", lambda c: c.lookupByUUIDString(uuid).hasManagedSaveImage(0),
                               read_only=True, domain=name))

    def managed_save_xml(self, uuid: str, name: str) -> str:
        return self._call("read managed save", lambda c: c.lookupByUUIDString(uuid).managedSaveGetXMLDesc(
            libvirt.VIR_DOMAIN_XML_SECURE), read_only=True, domain=name)

    def managed_save_define(self, uuid: str, name: str, xml: str) -> None:
        self._call("update managed save", lambda c: c.lookupByUUIDString(uuid).managedSaveDefineXML(xml, 0),
                   domain=name)

    def suspend(self, uuid: str, name: str) -> None:
        """Stop the guest's vCPUs; QEMU (and its block jobs) keep running."""
        self._call("pause domain", lambda c: c.lookupByUUIDString(uuid).suspend(), domain=name)

    def resume(self, uuid: str, name: str) -> None:
        self._call("resume domain", lambda c: c.lookupByUUIDString(uuid).resume(), domain=name)

    def start(self, uuid: str, name: str, *, paused: bool = False) -> None:
        """Start a defined domain (from its managed save image, when it has one)."""
        flags = libvirt.VIR_DOMAIN_START_PAUSED if paused else 0
        self._call("start domain", lambda c: c.lookupByUUIDString(uuid).createWithFlags(flags), domain=name)

    # -- snapshots -----------------------------------------------------------
    def snapshot(self, uuid: str, name: str, xml: str, *, memory: bool, quiesce: bool,
                 reuse_overlays: bool = False) -> None:
        """An external snapshot (`reuse_overlays`: the overlay files exist already, created by us)."""
        flags = libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA
        if reuse_overlays:
            flags |= libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_REUSE_EXT
        if memory:
            flags |= libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_LIVE
        else:
            flags |= libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY
        if quiesce:
            flags |= libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_QUIESCE
        self._call("external snapshot", lambda c: c.lookupByUUIDString(uuid).snapshotCreateXML(xml, flags),
                   domain=name)

    # -- checkpoints (persistent dirty bitmaps, for the segmented layout) --------
    def checkpoint_names(self, uuid: str, name: str) -> list[str]:
        return self._call("list checkpoints", lambda c: [cp.getName() for cp in
                                                         c.lookupByUUIDString(uuid).listAllCheckpoints(0)],
                          read_only=True, domain=name)

    def create_checkpoint(self, uuid: str, name: str, xml: str) -> None:
        self._call("create checkpoint", lambda c: c.lookupByUUIDString(uuid).checkpointCreateXML(xml, 0),
                   domain=name)

    def delete_checkpoint(self, uuid: str, name: str, checkpoint: str) -> None:
        """Delete a checkpoint and its bitmaps (never its metadata alone: that would leave a bitmap in the
        image that every write keeps up and nobody deletes)."""
        self._call(f"delete checkpoint {checkpoint}",
                   lambda c: c.lookupByUUIDString(uuid).checkpointLookupByName(checkpoint).delete(0), domain=name)

    def set_agent_timeout(self, uuid: str, name: str, seconds: float) -> None:
        with contextlib.suppress(VirtfreezeError, AttributeError):
            self._call("set agent timeout",
                       lambda c: c.lookupByUUIDString(uuid).agentSetResponseTimeout(max(1, int(seconds)), 0),
                       domain=name)

    # -- block jobs ----------------------------------------------------------
    @contextlib.contextmanager
    def block_job_events(self, uuid: str) -> Iterator[queue.Queue]:
        """A queue of (disk target, job type, status) for this domain's block jobs.

        Enter it *before* starting a job so no event can be missed. It keeps
        receiving across reconnects (every connection reports to it).
        """
        q: queue.Queue = queue.Queue()
        with self._lock:
            self._watchers.setdefault(uuid, []).append(q)
        try:
            yield q
        finally:
            with self._lock:
                self._watchers[uuid].remove(q)

    def block_commit(self, uuid: str, name: str, target: str, base: str, *, top: str | None = None,
                     active: bool, bandwidth: int = 0) -> None:
        """Start a commit into `base` (`bandwidth` bytes/s, 0: unlimited); MergeRefused when libvirt
        refuses (nothing has changed then)."""
        flags = libvirt.VIR_DOMAIN_BLOCK_COMMIT_BANDWIDTH_BYTES
        if active:
            flags |= libvirt.VIR_DOMAIN_BLOCK_COMMIT_ACTIVE
        try:
            self._call("start block commit",
                       lambda c: c.lookupByUUIDString(uuid).blockCommit(target, base, top, bandwidth, flags),
                       domain=name, disk=target, path=base)
        except DomainNotFound:
            raise
        except VirtfreezeError as e:
            raise MergeRefused(e.message, domain=e.domain, disk=e.disk, path=e.path, hint=e.hint) from None

    def set_job_speed(self, uuid: str, name: str, target: str, bandwidth: int) -> None:
        """Change a running block job's copy rate (bytes/s, 0: unlimited)."""
        self._call("set block job speed", lambda c: c.lookupByUUIDString(uuid).blockJobSetSpeed(
            target, bandwidth, libvirt.VIR_DOMAIN_BLOCK_JOB_SPEED_BANDWIDTH_BYTES), domain=name, disk=target)

    def block_job(self, uuid: str, name: str, target: str) -> dict:
        """The running block job on a disk ({} when none): type, cur, end."""
        return self._call("read block job", lambda c: c.lookupByUUIDString(uuid).blockJobInfo(target, 0),
                          read_only=True, domain=name, disk=target) or {}

    def pivot(self, uuid: str, name: str, target: str) -> None:
        self._call("pivot", lambda c: c.lookupByUUIDString(uuid).blockJobAbort(
            target, libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT), domain=name, disk=target)

    def cancel_job(self, uuid: str, name: str, target: str) -> None:
        self._call("cancel block job", lambda c: c.lookupByUUIDString(uuid).blockJobAbort(target, 0),
                   domain=name, disk=target)

    def wait_for_jobs(self, uuid: str, name: str, targets: set[str] | list[str], events: queue.Queue, *,
                      until: str, timeout: float, on_tick: Callable[[str, dict], None] | None = None) -> None:
        """Wait, event-driven and bounded, until the block job on each of `targets` reached `until`.

        - ``ready``: an active commit may be pivoted (READY; COMPLETED also ends the
          wait: somebody else pivoted, the caller checks the chain);
        - ``completed``: a commit of a middle layer finished (COMPLETED);
        - ``gone``: a cancelled job ended (any end event).

        `events` is a `block_job_events` queue entered before the job started,
        so no event is missed. Events are filtered by disk. Only after a
        reconnect (events lost meanwhile) is the state read again: the live
        XML's mirror for ``ready``, the job's presence otherwise. The same for
        every caller. A job that fails (or is cancelled, unless ``gone``) raises.
        `on_tick(target, job_info)` is called about once a second per pending
        disk (progress display). Raises when `timeout` seconds pass.
        """
        seen_generation = self.generation
        deadline = time.monotonic() + timeout
        pending = set(targets)
        if until != "completed":  # a job of an earlier run may be there already: no event will come
            pending = {t for t in pending if not self._job_reached(uuid, name, t, until, started=False)}
        while pending:
            try:
                disk, _type, status = events.get(timeout=max(0.0, min(1.0, deadline - time.monotonic())))
            except queue.Empty:
                if not self.alive():
                    self.reconnect(seen_generation)
                if self.generation != seen_generation:
                    seen_generation = self.generation
                    pending = {t for t in pending if not self._job_reached(uuid, name, t, until)}
                if pending and time.monotonic() >= deadline:
                    raise self._wait_timeout(name, pending, until, timeout)
                for t in sorted(pending) if on_tick else ():
                    on_tick(t, self.block_job(uuid, name, t))
                continue
            if disk not in pending:
                continue
            if status == JOB_COMPLETED or (status == JOB_READY and until == "ready"):
                pending.discard(disk)
            elif status in (JOB_FAILED, JOB_CANCELED):
                if until == "gone":
                    pending.discard(disk)
                    continue
                word = "failed" if status == JOB_FAILED else "was cancelled"
                raise VirtfreezeError(f"the {'commit' if until == 'ready' else 'commit round'} job {word}",
                                      domain=name, disk=disk)

    def _job_reached(self, uuid: str, name: str, target: str, until: str, started: bool = True) -> bool:
        """Has the job on `target` reached `until`? Read from libvirt: at the start of a wait, and
        after a reconnect (events may be lost). A ``ready`` job that vanished raises once started."""
        if until != "ready":
            return not self.block_job(uuid, name, target)
        ready = mirror_ready(self.xml(uuid, name), target)
        if ready is None and started:
            raise VirtfreezeError("the commit job vanished while libvirtd was away", domain=name, disk=target)
        return bool(ready)

    @staticmethod
    def _wait_timeout(name: str, pending: set[str], until: str, timeout: float) -> VirtfreezeError:
        disk = ",".join(sorted(pending))
        if until == "ready":
            return CommitNotReady(f"commit not ready to pivot after {timeout:g}s", domain=name, disk=disk,
                                  hint="the guest writes faster than the commit; raise commit_ready_timeout "
                                       "or use another strategy")
        if until == "completed":
            return VirtfreezeError(f"live commit round not finished after {timeout:.0f}s", domain=name, disk=disk)
        return VirtfreezeError("a cancelled block job did not end", domain=name, disk=disk)


def is_not_ready_error(err: VirtfreezeError) -> bool:
    return getattr(err, "libvirt_code", None) == libvirt.VIR_ERR_BLOCK_COPY_ACTIVE or "not ready" in err.message


def is_quiesce_unavailable(err: VirtfreezeError) -> bool:
    return getattr(err, "libvirt_code", None) in (
        libvirt.VIR_ERR_ARGUMENT_UNSUPPORTED, libvirt.VIR_ERR_AGENT_UNRESPONSIVE,
        libvirt.VIR_ERR_AGENT_UNSYNCED, libvirt.VIR_ERR_OPERATION_UNSUPPORTED,
    ) or "agent" in err.message.lower()


def mirror_ready(live_xml: str, target: str) -> bool | None:
    """For a disk with a block job in the live XML: is its mirror ready to pivot?

    None when the disk has no mirror (no two-phase job running).
    """
    for d in ET.fromstring(live_xml).findall("devices/disk"):
        t = d.find("target")
        if t is not None and t.get("dev") == target:
            m = d.find("mirror")
            return None if m is None else m.get("ready") == "yes"
    return None
