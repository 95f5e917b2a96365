"""Restore: an archive back to a defined (and by default running) domain.

The order makes a crash harmless. Everything is checked before anything is
written (restore_plan); data is extracted into a staging directory on the
destination filesystem and linked into place, each destination created
exclusively; qcow2 chains are re-pointed and checked; only then is the
domain defined, and last it is resumed from its memory image or started.
A record under the state directory lists every file as it is created, so
that after a crash the same command finishes the restore (the domain is
already running) or removes what the interrupted one left and starts over.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from virtfreeze import file_removal, qemu_img, runner, save_image
from virtfreeze.domain_xml import parse_disks
from virtfreeze.errors import UsageError, VirtfreezeError
from virtfreeze.journal import domain_lock, failpoint, write_atomic
from virtfreeze.libvirt_boundary import PAUSED, RUNNING, SHUTOFF
from virtfreeze.logs import domain_log
from virtfreeze.restore_plan import (
    ALWAYS_ALLOWED, SWTPM_DIR, Archive, ArchiveIncomplete, ArchiveRefused, Placement, RestorePlan, left_out_disks,
    check_data, check_paths, memory_complete, passthrough, plan_restore, read_archive, relocate_xml,
)
from virtfreeze.runtime import Runtime
from virtfreeze.segment_view import segment_name
from virtfreeze.sparse_copy import copy_file, copy_files_at

log = logging.getLogger(__name__)

META_FILES = ["manifest.json", "domain.xml"]
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"  # where programs are installed


@dataclass
class RestoreResult:
    name: str
    uuid: str
    new: bool  # a new domain beside the original
    source: str  # target:archive, or the directory
    state: str  # running, paused or shutoff
    from_memory: bool  # resumed from the archived memory state (no boot)
    files: list[str]
    bytes: int  # bytes written into place
    seconds: float
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Source:
    """Where the archive comes from: a configured target's archive, or a directory (`--from`)."""

    directory: Path | None = None
    target: object | None = None  # a StorageTarget
    archive: str | None = None
    domain: str | None = None  # the domain the archive must be of (restore DOMAIN)

    def describe(self) -> str:
        return str(self.directory) if self.directory else f"{self.target.name}:{self.archive}"


def configured_targets(rt: Runtime, names: list[str] | tuple[str, ...] = ()) -> list:
    """The configured targets, or those named (exit 2 naming an unknown one)."""
    from virtfreeze.targets import load_targets

    cfg = rt.config
    targets = load_targets(cfg.targets, rt.pm, str(cfg.source) if cfg.source else None)
    if not targets:
        raise UsageError("no storage target configured", hint="add `targets:` to the config, or use --from DIR")
    unknown = [n for n in names if n not in targets]
    if unknown:
        raise UsageError(f"unknown target {unknown[0]!r} (configured: {', '.join(sorted(targets))})")
    return [targets[n] for n in (names or sorted(targets))]


def list_archives(targets: list, patterns: list[str]) -> list:
    """Every virtfreeze archive in the targets whose domain matches a name or glob, newest first."""
    import fnmatch

    found = [a for t in targets for a in t.archives()
             if not patterns or any(fnmatch.fnmatchcase(a.domain, p) for p in patterns)]
    return sorted(found, key=lambda a: (a.time, a.target, a.archive), reverse=True)


def choose_archive(targets: list, domain: str, archive: str | None) -> Source:
    """The archive to restore: the one named (in whichever target holds it), or the domain's newest.
    A named archive in the one target given is taken as named (its extract says if it is not there)."""
    if archive and archive != "latest" and len(targets) == 1:
        return Source(target=targets[0], archive=archive, domain=domain)
    candidates = [a for a in list_archives(targets, [domain]) if a.domain == domain]
    if archive and archive != "latest":
        candidates = [a for a in candidates if a.archive == archive]
    if not candidates:
        where = ", ".join(t.name for t in targets)
        what = f"archive {archive!r} of this domain" if archive and archive != "latest" else "archive of this domain"
        raise UsageError(f"no {what} in {where}", domain=domain, hint="`virtfreeze archives` lists them")
    chosen = candidates[0]
    return Source(target=next(t for t in targets if t.name == chosen.target), archive=chosen.archive, domain=domain)


# -- the record of a restore in progress ----------------------------------------------

class RestoreRecord:
    """What a restore has created so far, written before each creation (for crash recovery)."""

    def __init__(self, state_dir: Path, name: str):
        self.path = state_dir / "restores" / f"{name.replace('/', '_')}.json"
        self.data: dict = {}

    def load(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None

    def save(self, **changes) -> None:
        self.data.update(changes)
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_atomic(self.path, json.dumps(self.data, indent=2).encode())

    def add(self, key: str, path: Path) -> None:
        self.save(**{key: [*self.data.get(key, []), str(path)]})

    def discard(self, key: str, path: Path) -> None:
        """`path` turned out not to be ours (it appeared meanwhile): never remove it on undo."""
        self.save(**{key: [p for p in self.data.get(key, []) if p != str(path)]})

    def set_aside(self, path: Path) -> Path:
        """Move a replaced domain's file or directory out of the way (put back on undo, deleted on success)."""
        aside = path.parent / f".{path.name}.virtfreeze-replaced"
        self.save(replaced_files=[*self.data.get("replaced_files", []), [str(path), str(aside)]])
        os.rename(path, aside)
        return aside

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        with contextlib.suppress(OSError):
            self.path.parent.rmdir()  # when no other restore is in progress


def _undo(rt: Runtime, data: dict) -> None:
    """Remove what an unfinished restore created: its definition, files and staging. A domain it had
    already started is complete: only the staging goes."""
    hv = rt.hv
    info = hv.info(data["uuid"]) if data.get("defined") else None
    if info is not None and data.get("started"):
        _finish_start(hv, data, info)
        _drop_replaced(data)
        data = {"staging": data.get("staging")}
    elif info is not None:
        if info.state != SHUTOFF:  # it was being resumed when this restore failed
            hv.destroy(info.uuid, info.name)
        hv.undefine(info.uuid, info.name)
    for path in reversed(data.get("files", [])):
        file_removal.remove_any(path)  # a restored disk: in steps, the other guests run on
    if data.get("staging"):  # first: it may lie in a directory this restore made
        file_removal.remove_tree(data["staging"])
    for path in reversed(data.get("dirs", [])):
        with contextlib.suppress(OSError):
            os.rmdir(path)  # only if empty: someone else may have put files there meanwhile
    for original, aside in reversed(data.get("replaced_files", [])):  # --replace: the old files come back
        if os.path.lexists(aside) and not os.path.lexists(original):
            os.rename(aside, original)
    if data.get("replaced_xml") and hv.info(data["replaced_uuid"]) is None:
        hv.define(data["replaced_xml"], data.get("name", "?"))  # and so does the old definition


def _finish_start(hv, data: dict, info) -> None:
    """A restore resumed from memory under a new name was interrupted before its links went down: it
    is still paused (it was restored paused for that); take them down, then run it as asked."""
    if data.get("links_pending") and info.state == PAUSED:
        hv.set_links_down(info.uuid, info.name)
        if data.get("want_state") == RUNNING:
            hv.resume(info.uuid, info.name)


def _drop_replaced(data: dict) -> None:
    """After a successful --replace: the old files set aside are deleted (in steps: the guests run on)."""
    for _original, aside in data.get("replaced_files", []):
        file_removal.remove_any(aside)


def recover(rt: Runtime, name: str) -> str | None:
    """Deal with an interrupted restore of `name`: "finished" when its domain runs (the restore had got
    that far), "cleaned" when its leftovers were removed, None when there was none."""
    record = RestoreRecord(rt.state_dir, name)
    data = record.load()
    if data is None:
        return None
    info = rt.hv.info(data["uuid"]) if data.get("defined") else None
    if info is not None and info.state in (RUNNING, PAUSED):
        _finish_start(rt.hv, data, info)
        if data.get("staging"):
            file_removal.remove_tree(data["staging"])
        _drop_replaced(data)
        record.remove()
        domain_log(log, name).warning("an interrupted restore had already started the domain; it is finished")
        return "finished"
    domain_log(log, name).warning("removing what an interrupted restore left (%d files)", len(data.get("files", [])))
    _undo(rt, data)
    record.remove()
    return "cleaned"


# -- the steps ----------------------------------------------------------------------------

def allowed_places(rt: Runtime, disk_dir: Path | None) -> list[Path]:
    roots = [*ALWAYS_ALLOWED, *(Path(p) for p in rt.config.restore_directories)]
    with contextlib.suppress(VirtfreezeError):
        roots += [Path(p) for p in rt.hv.pool_directories()]
    if disk_dir is not None:
        roots.append(disk_dir)
    return roots


def _existing(rt: Runtime, plan: RestorePlan, archive: Archive, replace: bool) -> object | None:
    """The domain a `--replace` overwrites (or None); refuse (exit 2) anything else in the way."""
    hv = rt.hv
    by_name = hv.info_by_name(plan.name)
    by_uuid = hv.info(plan.uuid)
    if by_uuid is not None and by_uuid.name != plan.name:
        raise UsageError(f"domain {by_uuid.name!r} already has the archived UUID {plan.uuid}", domain=plan.name,
                         hint="restore as a new domain with --name NEW")
    if by_name is not None:
        if not replace:
            raise UsageError("a domain of this name exists", domain=plan.name,
                             hint="restore with --name NEW, or --replace to overwrite it when it is shut off")
        if by_name.state != SHUTOFF:
            raise UsageError(f"the domain is {by_name.state}; --replace overwrites only a shut-off domain",
                             domain=plan.name, hint="shut it down first, or restore with --name NEW")
    own: set[str] = set()
    if by_name is not None:
        from virtfreeze.domain_xml import nvram_path, parse_disks

        xml = hv.xml(by_name.uuid, by_name.name, inactive=True)
        own = {d.source for d in parse_disks(xml) if d.source}  # not backing files: they may be shared
        if nvram_path(xml):
            own.add(nvram_path(xml))
        own.add(str(Path("/var/lib/libvirt/swtpm") / by_name.uuid))
    for p in plan.placements:
        if os.path.lexists(p.dest):
            if str(p.dest) in own:
                continue
            raise UsageError(f"{p.dest} exists" + (" and is not the replaced domain's" if replace else ""),
                             domain=plan.name, path=str(p.dest),
                             hint="move it away, restore with --name NEW or --disk-dir DIR"
                                  + ("" if replace else ", or --replace for a shut-off domain's own files"))
    return by_name


def _make_dirs(directory: Path, record: RestoreRecord) -> None:
    """Create `directory` and missing parents (0700 where new), recording each for clean-up."""
    missing = []
    d = directory
    while not d.exists():
        missing.append(d)
        d = d.parent
    for d in reversed(missing):
        record.add("dirs", d)
        d.mkdir(mode=0o711 if d == SWTPM_DIR else 0o700)  # as libvirt makes it: each domain's own is 0700
        os.chmod(d, 0o711 if d == SWTPM_DIR else 0o700)


def _create_exclusive(dest: Path, record: RestoreRecord, mode: int = 0o600) -> int:
    """A new file at `dest` (never through a symlink, never over an existing file): its fd."""
    record.add("files", dest)
    try:
        return os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except FileExistsError:
        record.discard("files", dest)
        raise VirtfreezeError("appeared meanwhile; not overwriting it", path=str(dest)) from None


def _place_file(src: Path, dest: Path, record: RestoreRecord, *, link: bool, replace: bool, progress) -> None:
    """Put one data file at `dest`: linked from our staging directory when it is on the same
    filesystem (no second copy), else a sparse copy into a partial file that is then linked."""
    _make_dirs(dest.parent, record)
    if replace and os.path.lexists(dest):
        record.set_aside(dest)  # the replaced domain's own file (checked): back in place if this fails
    if link and os.stat(src).st_dev == os.stat(dest.parent).st_dev:
        record.add("files", dest)
        try:
            os.link(src, dest, follow_symlinks=False)
        except FileExistsError:
            record.discard("files", dest)
            raise VirtfreezeError("appeared meanwhile; not overwriting it", path=str(dest)) from None
        os.chmod(dest, 0o600, follow_symlinks=False)
        progress(os.stat(dest).st_size)
        return
    _fill_and_link(dest, record, lambda fd: copy_file(src, fd, what=f"copy of {src}", on_bytes=progress))


def _fill_and_link(dest: Path, record: RestoreRecord, fill) -> None:
    """Write a new file through `fill(fd)` into an exclusively created partial file beside `dest`,
    then link it into place (never over anything that appeared meanwhile)."""
    partial = dest.parent / f".{dest.name}.virtfreeze-partial"
    fd = _create_exclusive(partial, record)
    try:
        fill(fd)
    finally:
        os.close(fd)
    record.add("files", dest)
    try:
        os.link(partial, dest)
    except FileExistsError:
        record.discard("files", dest)
        raise VirtfreezeError("appeared meanwhile; not overwriting it", path=str(dest)) from None
    os.unlink(partial)


def reassemble(src_dir: Path, p: Placement, fd: int, progress=None) -> None:
    """A segmented disk's guest bytes into `fd` (an empty file), sparsely, in segment order."""
    got = copy_files_at((src_dir / segment_name(i, p.segments.count) for i in range(p.segments.count)), fd,
                        what=f"reassembly of {src_dir}", on_bytes=progress)
    if got != p.segments.size:  # the files changed after they were checked
        raise ArchiveIncomplete(f"disk {p.target}: its segments hold {got} of {p.segments.size} bytes",
                                path=str(src_dir))


def _place_segments(src_dir: Path, p: Placement, staging: Path, record: RestoreRecord, *, replace: bool,
                    progress, domain: str) -> None:
    """Put a segmented disk at `p.dest` in its format: raw reassembled into place; qcow2 reassembled
    into the private staging directory, converted there (no backing file) and placed like a file."""
    if p.format == "raw":
        _make_dirs(p.dest.parent, record)
        if replace and os.path.lexists(p.dest):
            record.set_aside(p.dest)
        _fill_and_link(p.dest, record, lambda fd: reassemble(src_dir, p, fd, progress))
        return
    raw, image = staging / f"{p.target}.segments.raw", staging / f"{p.target}.segments.qcow2"
    fd = os.open(raw, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        reassemble(src_dir, p, fd, progress)
    finally:
        os.close(fd)
    runner.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(image)],
               what="qemu-img convert", domain=domain, disk=p.target, path=str(image))
    os.unlink(raw)
    _place_file(image, p.dest, record, link=True, replace=replace, progress=lambda _n: None)
    os.unlink(image)  # linked or copied: the staged name only holds space


def _place_tree(src: Path, dest: Path, record: RestoreRecord, replace: bool) -> None:
    """Copy a small tree (TPM state): directories 0700, files 0600, nothing through a symlink."""
    if replace and os.path.lexists(dest):
        record.set_aside(dest)
    _make_dirs(dest.parent, record)
    record.add("files", dest)
    try:
        os.mkdir(dest, 0o700)
    except FileExistsError:
        record.discard("files", dest)
        raise VirtfreezeError("appeared meanwhile; not overwriting it", path=str(dest)) from None
    for dirpath, dirnames, filenames in os.walk(src):
        rel = Path(dirpath).relative_to(src)
        for d in dirnames:
            os.mkdir(dest / rel / d, 0o700)
        for f in filenames:
            fd = os.open(dest / rel / f, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            try:
                copy_file(Path(dirpath) / f, fd, what="copy of TPM state")
            finally:
                os.close(fd)


QEMU_CONF = Path("/etc/libvirt/qemu.conf")


def swtpm_owner(conf: Path = QEMU_CONF) -> tuple[int, int] | None:
    """uid and gid libvirt runs swtpm as (qemu.conf's swtpm_user/swtpm_group, default tss), or None
    when that user does not exist here."""
    import grp
    import pwd
    import re

    settings = {"swtpm_user": "tss", "swtpm_group": "tss"}
    with contextlib.suppress(OSError):
        for m in re.finditer(r'^\s*(swtpm_user|swtpm_group)\s*=\s*"([^"]*)"', conf.read_text(), re.M):
            settings[m.group(1)] = m.group(2)
    try:
        uid = pwd.getpwnam(settings["swtpm_user"]).pw_uid
        gid = grp.getgrnam(settings["swtpm_group"]).gr_gid
    except KeyError:
        return None
    return uid, gid


def _chown_tree(top: Path, owner: tuple[int, int]) -> None:
    """TPM state belongs to the user swtpm runs as (libvirt does not change an existing state's owner)."""
    for dirpath, dirnames, filenames in os.walk(top):
        for n in (".", *dirnames, *filenames):
            os.chown(os.path.join(dirpath, n), *owner, follow_symlinks=False)


def _sync(plan: RestorePlan) -> None:
    """fsync every restored file and the directories that hold them (borg and restic do not)."""
    dirs = set()
    for p in plan.placements:
        paths = [Path(d) / f for d, _dn, fs in os.walk(p.dest) for f in fs] if p.kind == "tpm" else [p.dest]
        for path in paths:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            dirs.add(path.parent)
    for d in dirs:
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _check_images(plan: RestorePlan) -> None:
    """Refuse a qcow2 that names a backing file the archive does not hold (it could name any host
    file or device); re-point each restored one at its restored backing file; `qemu-img check` all."""
    qcow2 = [p for p in plan.placements if p.kind in ("disk", "backing") and p.format == "qcow2"]
    for p in plan.placements:
        archived = p.backing_dest if p.kind == "overlay" else p.dest  # the image as the archive had it
        is_qcow2 = (p.backing_format if p.kind == "overlay" else p.format) == "qcow2"
        if is_qcow2 and p.kind in ("disk", "backing", "overlay") and (p.kind == "overlay" or p.backing_dest is None):
            backing, _fmt = qemu_img.backing_of(str(archived), plan.name, p.target)
            if backing:
                raise ArchiveRefused(f"the archived image names the backing file {backing}, which the archive lacks",
                                     domain=plan.name, disk=p.target, path=str(archived),
                                     hint="an archive is data: refusing it")
        if p.kind == "overlay" and is_qcow2:  # the archived image it reads in place
            runner.run(["qemu-img", "check", "-q", "-U", "-f", "qcow2", str(archived)], what="qemu-img check",
                       domain=plan.name, disk=p.target, path=str(archived),
                       hint="the archived image is damaged: try an older archive")
    for p in qcow2:
        if p.backing_dest is not None:
            runner.run(["qemu-img", "rebase", "-u", "-b", str(p.backing_dest), "-F", p.backing_format or "raw",
                        "-f", "qcow2", str(p.dest)], what="qemu-img rebase", domain=plan.name, disk=p.target,
                       path=str(p.dest))
    for p in [*qcow2, *(p for p in plan.placements if p.kind == "overlay")]:
        runner.run(["qemu-img", "check", "-q", "-f", "qcow2", str(p.dest)], what="qemu-img check",
                   domain=plan.name, disk=p.target, path=str(p.dest),
                   hint="the archived image is damaged: try an older archive")


def check_memory_xml(xml: str, plan: RestorePlan) -> None:
    """The memory image's own XML passes the definition's checks and has the same disks (it is what
    QEMU is started with)."""
    check_paths(xml, plan.name, plan.allowed)
    disks = {d.target: d.source for d in parse_disks(xml)}
    wanted = {d.target: d.source for d in parse_disks(plan.definition)}
    if disks != wanted:
        raise ArchiveRefused("the memory image's definition names other disks than domain.xml",
                             domain=plan.name, hint="restore with --no-memory (cold boot)")


def check_decompressor(program: str | None, domain: str, where: str, search: str | None = None) -> None:
    """A memory image whose stream the saving host compressed with `program` (None: not compressed)
    resumes only through it (libvirt runs `PROGRAM -dc`): if it is not installed here, say so before the
    restore goes on. `where` names the image for the user; `search`: where to look, by default our PATH
    and the usual system directories."""
    if program is None:
        return
    if search is None:
        search = os.pathsep.join(filter(None, [os.environ.get("PATH"), SYSTEM_PATH]))
    if shutil.which(program, path=search) is None:
        raise UsageError(f"the memory image is compressed with {program}, which is not installed here",
                         domain=domain, path=where,
                         hint=f"install {program} here, or restore with --no-memory to cold-boot from the disks")


def recorded_compression(manifest: dict) -> str | None:
    """The program the manifest says the memory image was compressed with, if it is one libvirt uses
    (an archive is data: any other value is ignored, and the image's own header decides later)."""
    program = manifest.get("memory_compression")
    return program if program in save_image.COMPRESSION.values() and program != "raw" else None


def _drop_peek(peek: Path | None) -> None:
    if peek is not None:
        shutil.rmtree(peek, ignore_errors=True)
        with contextlib.suppress(OSError):
            peek.parent.rmdir()  # state_dir/restores, when no restore is in progress


def _extract(source: Source, destination: Path, paths: list[str] | None = None) -> Path:
    return source.target.extract(source.archive, destination, paths=paths)


def restore(rt: Runtime, source: Source, **options) -> RestoreResult:
    """Restore one archive; see the module docstring for the order of the steps, and `_restore` for
    the options. A filesystem error (full, read-only, denied) is one line naming the path."""
    try:
        return _restore(rt, source, **options)
    except OSError as e:
        raise VirtfreezeError(f"restore failed: {e.strerror or e}", path=e.filename,
                              hint="nothing was defined and what it wrote was removed; fix the cause and run it "
                                   "again") from None


def _restore(rt: Runtime, source: Source, *, name: str | None = None, disk_dir: Path | None = None,
             replace: bool = False, start: bool | None = None, memory: bool | None = None,
             isolate: bool = False, file_dir: Path | None = None, overlay: bool = False) -> RestoreResult:
    """`isolate`, `file_dir` and `overlay` are for a verify (see `plan_restore`); `overlay` needs a
    source directory that stays in place."""
    t0 = time.monotonic()
    if disk_dir is not None:
        disk_dir = Path(os.path.abspath(disk_dir))
    allowed = allowed_places(rt, disk_dir)

    # 1. Read the definition and manifest; decide and check every destination before writing any.
    peek = None
    if source.directory is not None:
        archive = read_archive(source.directory, data=True)
    else:
        work = rt.state_dir / "restores"
        work.mkdir(parents=True, exist_ok=True, mode=0o700)
        peek = Path(tempfile.mkdtemp(prefix=".peek-", dir=work))
        try:
            archive = read_archive(_extract(source, peek / "a", META_FILES), data=False)
        except BaseException:
            _drop_peek(peek)
            raise
    if source.domain is not None and archive.name != source.domain:
        _drop_peek(peek)
        raise UsageError(f"{source.describe()} is an archive of domain {archive.name!r}", domain=source.domain,
                         hint="`virtfreeze archives` lists each domain's archives")
    if memory and archive.memory is None:
        _drop_peek(peek)
        raise UsageError("the archive holds no memory state", domain=name or archive.name,
                         hint="restore without --memory")
    if start is None:  # the state it had when it was frozen
        want_state = archive.state_at_freeze if archive.state_at_freeze in (RUNNING, PAUSED) else SHUTOFF
    else:
        want_state = RUNNING if start else SHUTOFF
    use_memory = archive.memory is not None and memory is not False and want_state != SHUTOFF
    if use_memory and isolate and passthrough(archive.xml):  # a verify drops them: the memory state cannot resume
        use_memory = False
    if use_memory and (name not in (None, archive.name)) and left_out_disks(archive):
        use_memory = False  # a new domain leaves out the disks the archive lacks: its memory state has them
        log.warning("domain %r: %s not in the archive, so the new domain cold-boots (its memory state needs them)",
                    name, ", ".join(left_out_disks(archive)))
    try:
        plan = plan_restore(archive, name=name, disk_dir=disk_dir, allowed=allowed, file_dir=file_dir,
                            isolate=("memory" if use_memory else "cold") if isolate else None,
                            overlay=overlay and source.directory is not None)
    finally:
        _drop_peek(peek)
    dlog = domain_log(log, plan.name)
    if use_memory and source.directory is not None:  # its XML is checked before anything is written
        memory_complete(archive)
        image = save_image.read(archive.root / archive.memory)
        check_decompressor(image.decompressor, plan.name, str(archive.root / archive.memory))
        check_memory_xml(relocate_xml(image.xml, plan.relocation), plan)
    elif use_memory:  # not extracted yet: what the manifest recorded at the freeze, before hours of extraction
        check_decompressor(recorded_compression(archive.manifest), plan.name,
                           f"{archive.memory} in {source.describe()}")
    links_down = use_memory and plan.new and bool(plan.relocation.macs)
    if links_down:
        plan.warnings.append("resumed from memory under a new name: its network links are down, because its memory "
                             "still holds the original's MAC and IP addresses (until it reboots); change them in the "
                             f"guest, then `virsh domif-setlink {plan.name} IFACE up`")

    with domain_lock(f"restore-{plan.name}", plan.name):
        if recover(rt, plan.name) == "finished":
            info = rt.hv.info_by_name(plan.name)
            return RestoreResult(plan.name, plan.uuid, plan.new, source.describe(), info.state if info else "?",
                                 use_memory, [str(f) for f in plan.files()], 0, time.monotonic() - t0,
                                 ["finished an interrupted restore"])
        replaced = _existing(rt, plan, archive, replace)
        record = RestoreRecord(rt.state_dir, plan.name)
        record.save(name=plan.name, uuid=plan.uuid, defined=False, files=[], dirs=[], staging=None)
        try:
            return _restore_locked(rt, source, archive, plan, record, replaced, use_memory, want_state, links_down,
                                   t0, dlog)
        except BaseException:
            data = record.load() or record.data
            try:
                _undo(rt, data)
            finally:
                record.remove()
            raise


def _restore_locked(rt, source, archive, plan, record, replaced, use_memory, want_state, links_down, t0,
                    dlog) -> RestoreResult:
    hv = rt.hv
    # 2. Stage: extract into a directory on the destination filesystem (or read the given directory).
    first = plan.placements[0].dest.parent if plan.placements else rt.state_dir / "restores"
    _make_dirs(first, record)
    staging = Path(tempfile.mkdtemp(prefix=f".virtfreeze-restore-{plan.name}-", dir=first))
    os.chmod(staging, 0o700)
    record.save(staging=str(staging))
    if source.directory is None:
        rt.progress.update(plan.name, f"extracting {source.describe()}")
        dlog.info("extracting %s into %s", source.describe(), staging)
        root = _extract(source, staging / "archive")
        staged = read_archive(root, data=True)
        if (staged.name, staged.uuid, staged.xml) != (archive.name, archive.uuid, archive.xml):
            raise VirtfreezeError("the archive changed between reading its definition and extracting it",
                                  path=source.describe())
        archive = staged
    else:
        check_data(archive)
    failpoint("restore-after-extract")

    # 3. Memory image: checked, and its XML relocated like the definition (in a private copy).
    memory_file = None
    if use_memory:
        if source.directory is None:  # (from a directory it was checked before anything was written)
            memory_complete(archive)
        src = archive.root / archive.memory
        if source.directory is not None:
            memory_file = staging / "memory.save"
            rt.progress.update(plan.name, "copying the memory image")
            fd = _create_exclusive(memory_file, record)
            try:
                copy_file(src, fd, what="copy of the memory image")
            finally:
                os.close(fd)
        else:
            memory_file = src
            os.chmod(memory_file, 0o600)
        image = save_image.read(memory_file)
        if source.directory is None:  # its header decides (an archive of an older version records nothing)
            check_decompressor(image.decompressor, plan.name, f"{archive.memory} in {source.describe()}")
        memory_xml = relocate_xml(image.xml, plan.relocation)
        check_memory_xml(memory_xml, plan)  # the image's own XML is archive data too
        save_image.rewrite_xml(memory_file, memory_xml)

    # 4. Files into place, each created exclusively.
    written = 0
    total = sum(p.segments.size if p.segments else os.stat(archive.root / p.source).st_size
                for p in plan.placements if p.kind not in ("tpm", "overlay"))  # what is copied
    done = [0]

    def progress(n: int) -> None:
        done[0] += n
        rt.progress.update(plan.name, f"copying {100 * done[0] // max(total, 1)}% of {total >> 20} MiB")

    replace = replaced is not None
    if replaced is not None:
        dlog.warning("replacing the shut-off domain and its files (--replace)")
        record.save(replaced_uuid=replaced.uuid, replaced_xml=hv.xml(replaced.uuid, replaced.name, inactive=True))
        hv.undefine(replaced.uuid, replaced.name)
    for p in plan.placements:
        src = archive.root / p.source
        if p.kind == "overlay":  # read in place: a new qcow2 over the archived image
            _make_dirs(p.dest.parent, record)
            record.add("files", p.dest)
            runner.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(p.backing_dest), "-F",
                        p.backing_format, str(p.dest)], what="qemu-img create", domain=plan.name, disk=p.target,
                       path=str(p.dest))
            written += os.stat(p.dest).st_size
            continue
        if p.kind == "tpm":
            _place_tree(src, p.dest, record, replace)
            owner = swtpm_owner()
            if owner is not None:
                _chown_tree(p.dest, owner)
        elif p.segments is not None:
            _place_segments(src, p, staging, record, replace=replace, progress=progress, domain=plan.name)
            written += os.stat(p.dest).st_size
            if source.directory is None:  # our extracted copy, now reassembled: its space back, in steps
                file_removal.remove_tree(src)
        else:
            _place_file(src, p.dest, record, link=source.directory is None, replace=replace, progress=progress)
            written += os.stat(p.dest).st_size
    _sync(plan)  # on disk before the domain is defined: a power loss never leaves it on half-written files
    failpoint("restore-after-place")
    rt.progress.update(plan.name, "checking images")
    _check_images(plan)

    # 5. Define, then resume or start.
    record.save(defined=True)
    hv.define(plan.definition, plan.name)
    failpoint("restore-after-define")
    state = SHUTOFF
    if use_memory:
        rt.progress.update(plan.name, "resuming from memory")
        record.save(links_pending=links_down, want_state=want_state)
        hv.restore_image(str(memory_file), plan.name, paused=want_state == PAUSED or links_down)
        record.save(started=True)
        if links_down:  # before its vCPUs run a single instruction
            hv.set_links_down(plan.uuid, plan.name)
            if want_state == RUNNING:
                hv.resume(plan.uuid, plan.name)
        state = want_state
    elif want_state in (RUNNING, PAUSED):
        rt.progress.update(plan.name, "starting")
        hv.start(plan.uuid, plan.name, paused=want_state == PAUSED)
        record.save(started=True)
        state = want_state
    file_removal.remove_tree(staging)  # what the archive held beyond the disks: in steps
    _drop_replaced(record.data)
    record.remove()
    rt.progress.finish(plan.name)
    for w in plan.warnings:
        dlog.warning("%s", w)
    return RestoreResult(plan.name, plan.uuid, plan.new, source.describe(), state, use_memory,
                         [str(f) for f in plan.files()], written, time.monotonic() - t0, plan.warnings)
