"""The one runner for external commands (qemu-img, mount, borg, restic, ...) and helpers.

Never a shell: argv is a list, names and paths are arguments. A failure
becomes one VirtfreezeError naming the command, the domain, disk or path it
concerned, the exit code and the last lines of its stderr.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import shutil
import signal
import subprocess
import tempfile
import threading
from typing import Callable, Iterator

from virtfreeze import priority
from virtfreeze.errors import VirtfreezeError

log = logging.getLogger(__name__)

STDERR_LINES = 3  # how much of a failed command's stderr goes into the error


def _unblock_signals() -> None:
    """In the child, before exec: no blocked signals.

    virtfreeze's worker threads block SIGTERM/SIGHUP/SIGINT (they belong to
    the main thread), and a child inherits the mask of the thread that
    started it: borg would ignore systemd's SIGTERM and a device view could
    never be stopped. A stop signal held until now gets the default action,
    never Python's handler (a KeyboardInterrupt here would fail the start);
    ignored ones stay ignored, as exec keeps them. Only async-signal-safe
    calls run here.
    """
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) is not signal.SIG_IGN:
            signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())


def _child_setup(cgroup_procs: list[str]):
    """What the child does before exec: unblock signals, and join the archive's cgroups if any."""
    if not cgroup_procs:
        return _unblock_signals

    def setup() -> None:
        for procs in cgroup_procs:
            try:
                fd = os.open(procs, os.O_WRONLY)
                os.write(fd, b"0")  # "0": the writing process itself
                os.close(fd)
            except OSError:
                pass  # a lower priority is a wish, never a reason to fail the archive
        _unblock_signals()  # last: nothing above is interrupted

    return setup


def last_lines(text: str | None, n: int = STDERR_LINES) -> str:
    """The last `n` non-empty lines of a command's output, joined with ' | '."""
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return " | ".join(lines[-n:])


class CancelScope:
    """Work that may be stopped from another thread (e.g. an archive whose domain paused on an I/O
    error): `cancel` terminates the commands running in it, and later ones fail at once."""

    def __init__(self):
        self._lock = threading.Lock()
        self._running: set[subprocess.Popen] = set()
        self.reason: str | None = None

    def cancel(self, reason: str) -> None:
        with self._lock:
            self.reason = self.reason or reason
            for proc in self._running:
                proc.terminate()

    def check(self, what: str = "work") -> None:
        """Raise when the scope was cancelled (for work that runs no command, e.g. a copy loop)."""
        if self.reason:
            raise VirtfreezeError(f"{what} stopped: {self.reason}")

    def _enter(self, proc: subprocess.Popen) -> None:
        with self._lock:
            self._running.add(proc)
            if self.reason:
                proc.terminate()

    def _leave(self, proc: subprocess.Popen) -> None:
        with self._lock:
            self._running.discard(proc)


_scope = threading.local()


@contextlib.contextmanager
def cancel_scope() -> Iterator[CancelScope]:
    """Commands this thread runs inside the block can be stopped through the scope it yields."""
    scope, previous = CancelScope(), getattr(_scope, "current", None)
    _scope.current = scope
    try:
        yield scope
    finally:
        _scope.current = previous


def check_cancelled(what: str = "work") -> None:
    """Raise when this thread's cancel scope (if any) was cancelled."""
    scope = getattr(_scope, "current", None)
    if scope is not None:
        scope.check(what)


def run(argv: list[str], *, what: str | None = None, domain: str | None = None, disk: str | None = None,
        path: str | None = None, ok: tuple[int, ...] = (0,), hint: str | None = None,
        install_hint: str | None = None, input: str | None = None,
        on_line: Callable[[str], None] | None = None, stream: str = "stdout",
        stderr_text: Callable[[str], str] | None = None, **kw) -> subprocess.CompletedProcess:
    """Run `argv` (no shell) and return it; raise a VirtfreezeError when its exit code is not in `ok`.

    `what` names the command in messages (default: the program's name);
    its output is captured (only the CLI writes to the terminal);
    `install_hint` is the hint when the program is missing. Inside a
    `cancel_scope`, cancelling terminates it. Other keyword arguments go to
    subprocess.Popen (env, cwd, ...).

    `on_line` is called, in this thread, with each line of `stream`
    ("stdout" or "stderr"; without its line end) as the command writes it,
    e.g. to follow its progress; the output is still captured whole. If
    it raises, the command is terminated and the exception raised.
    `stderr_text` turns the captured stderr into the text a failure message
    quotes (e.g. a tool's JSON log lines into their messages).
    """
    if stream not in ("stdout", "stderr"):
        raise ValueError(f"stream is 'stdout' or 'stderr', not {stream!r}")
    what = what or argv[0]
    scope = getattr(_scope, "current", None)
    popen = _start(argv, what, domain=domain, disk=disk, path=path, hint=install_hint,
                   stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)
    argv = popen.args
    if scope is not None:
        scope._enter(popen)
    try:
        with priority.running(popen.pid):  # inside priority.archiving: its writes go to disk as it makes them
            if on_line is None:
                stdout, stderr = popen.communicate(input)
            else:
                stdout, stderr = _follow(popen, input, on_line, stream)
    finally:
        if scope is not None:
            scope._leave(popen)
    proc = subprocess.CompletedProcess(argv, popen.returncode, stdout, stderr)
    if scope is not None and scope.reason:
        raise VirtfreezeError(f"{what} stopped: {scope.reason}", domain=domain, disk=disk, path=path)
    if proc.returncode not in ok:
        # never stdout: it may hold a secret (passphrase commands)
        said = last_lines(stderr_text(proc.stderr or "") if stderr_text else proc.stderr)
        raise VirtfreezeError(f"{what} failed (exit {proc.returncode})" + (f": {said}" if said else ""),
                              domain=domain, disk=disk, path=path, hint=hint)
    return proc


class CannotRun(VirtfreezeError):
    """A program that could not be started; `errno` says why (ENOENT: not found; 0: the nice/ionice
    prefix failed, not the program)."""

    def __init__(self, message: str, error_number: int, **where):
        super().__init__(message, **where)
        self.errno = error_number


def _start(argv: list[str], what: str, *, domain: str | None = None, disk: str | None = None,
           path: str | None = None, hint: str | None = None, **popen_kw) -> subprocess.Popen:
    """Start `argv` as every command starts: inside priority.archiving under its nice/ionice prefix and
    joining its cgroups. A program that cannot run is a CannotRun naming the domain, disk or path."""
    where = dict(domain=domain, disk=disk, path=path, hint=hint or "install it, or check the program path")
    prefix = priority.command_prefix()  # inside priority.archiving: nice/ionice
    if prefix and shutil.which(argv[0]) is None:  # say so as without the prefix, not as ionice's exit 127
        code = errno.EACCES if os.sep in argv[0] and os.path.exists(argv[0]) else errno.ENOENT
        raise CannotRun(f"{what}: cannot run {argv[0]}: {os.strerror(code)}", code, **where)
    argv = [*prefix, *argv]
    cgroups = [str(p) for p in priority.child_cgroups()]
    log.debug("running %s", argv)
    try:
        return subprocess.Popen(argv, preexec_fn=_child_setup(cgroups), **popen_kw)
    except OSError as e:  # behind the prefix (its program was found above), ionice or nice failed: errno 0
        raise CannotRun(f"{what}: cannot run {argv[0]}: {e.strerror}", 0 if prefix else e.errno, **where) from None


def run_through(argv: list[str]) -> int:
    """Run `argv` (no shell) on this process's stdin, stdout and stderr, and return its exit code (128 + the
    signal's number when a signal ended it): a wrapper's run, started as `run` starts a command. SIGTERM and
    SIGHUP sent to us go on to it, also one arriving while it starts; SIGINT is left to the terminal, which
    sends it to both. Main thread only."""
    forward = {signal.SIGTERM, signal.SIGHUP}
    started: list[subprocess.Popen] = []
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, forward | {signal.SIGINT})  # held until the handlers are in
    previous = {}
    try:
        started.append(_start(argv, argv[0]))  # the child unblocks them itself (_child_setup)
        previous = {sig: signal.signal(sig, lambda signum, _frame: started[0].send_signal(signum)) for sig in forward}
        previous[signal.SIGINT] = signal.signal(signal.SIGINT, signal.SIG_IGN)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # a signal held meanwhile arrives now
    try:
        with priority.running(started[0].pid):
            code = started[0].wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 128 - code if code < 0 else code


STOP_TIMEOUT = 30.0  # seconds a followed command gets to exit after SIGTERM before SIGKILL


def _follow(popen: subprocess.Popen, input: str | None, on_line: Callable[[str], None],
            stream: str) -> tuple[str, str]:
    """`popen.communicate(input)`, calling `on_line` with each line of `stream` as it comes.

    This thread reads the followed pipe; a helper thread each drains the
    other pipe and writes `input`, so that a command filling one pipe while
    we wait on the other never blocks.
    """
    followed, other = (popen.stdout, popen.stderr) if stream == "stdout" else (popen.stderr, popen.stdout)
    drained: list[str] = []
    failed: list[BaseException] = []

    def drain() -> None:
        try:
            drained.append(other.read())
        except Exception as e:  # noqa: BLE001 - e.g. undecodable output: raised in the caller, as communicate does
            failed.append(e)

    def feed() -> None:
        try:
            popen.stdin.write(input)
        except (BrokenPipeError, ValueError):  # it exited (or was stopped) before reading it all
            pass
        finally:
            with contextlib.suppress(OSError):
                popen.stdin.close()  # always: a command waiting for the end of its input must get it

    helpers = [threading.Thread(target=drain, name="runner-drain", daemon=True)]
    if input is not None:
        helpers.append(threading.Thread(target=feed, name="runner-feed", daemon=True))
    for t in helpers:
        t.start()
    lines: list[str] = []
    try:
        for line in followed:
            lines.append(line)
            on_line(line.rstrip("\r\n"))
    except BaseException:
        popen.terminate()
        followed.close()  # no reader any more: a command still writing gets EPIPE, never a full pipe
        try:
            popen.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            popen.kill()
        raise
    finally:
        popen.wait()
        for t in helpers:
            t.join()
        followed.close()
        other.close()
    if failed:
        raise failed[0]
    out, err = "".join(lines), "".join(drained)
    return (out, err) if stream == "stdout" else (err, out)


def start_daemon(argv_with_ready_fd: Callable[[int], list[str]], *, what: str, timeout: float = 30.0,
                 domain: str | None = None, disk: str | None = None, path: str | None = None,
                 install_hint: str | None = None) -> int:
    """Start a long-running helper in its own session and wait until it says it is ready; return its pid.

    The helper gets the write end of a pipe (its number goes into its argv)
    and writes a line starting with "ready" there once it serves; if it
    exits first, or says nothing within `timeout`, it is killed and the
    last lines of its stderr make the error.
    """
    r, w = os.pipe()
    with tempfile.TemporaryFile() as err:
        try:
            argv = argv_with_ready_fd(w)
            log.debug("starting %s", argv)
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                    pass_fds=(w,), start_new_session=True, preexec_fn=_unblock_signals)
        except OSError as e:
            os.close(r)
            raise VirtfreezeError(f"{what}: cannot run {argv[0]}: {e.strerror}", domain=domain, disk=disk,
                                  path=path, hint=install_hint) from None
        finally:
            os.close(w)
        try:
            said = os.read(r, 64) if select.select([r], [], [], timeout)[0] else b""
        finally:
            os.close(r)
        if said.startswith(b"ready"):
            return proc.pid
        silent = f"no answer within {timeout:g}s" if proc.poll() is None else None
        proc.kill()
        code = proc.wait()
        err.seek(0)
        why = last_lines(err.read().decode(errors="replace")) or silent or f"exit {code}"
        raise VirtfreezeError(f"{what} did not start: {why}", domain=domain, disk=disk, path=path,
                              hint=install_hint)


def stop_pid(pid: int, *, timeout: float = STOP_TIMEOUT, what: str = "helper", grace: float = 0.0) -> None:
    """Stop a helper that is not our child (a view, a forked qemu-nbd) and wait for it to exit: first
    `grace` seconds for it to exit on its own (e.g. once unmounted), then SIGTERM, then after `timeout`
    SIGKILL."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    stop_pidfd(fd, timeout=timeout, what=f"{what} (pid {pid})", grace=grace)


def stop_pidfd(fd: int, *, timeout: float = STOP_TIMEOUT, what: str = "helper", grace: float = 0.0) -> None:
    """`stop_pid` of the process a pidfd holds (no pid reuse can redirect a signal); closes the pidfd."""
    try:
        if grace > 0 and select.select([fd], [], [], grace)[0]:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(fd, sig)
            if select.select([fd], [], [], timeout)[0]:  # readable once the process exited
                return
            log.warning("%s did not exit within %.0fs of SIGTERM; killing it", what, timeout)
    finally:
        os.close(fd)
