"""Archive progress: the borg and restic line parsers, runner.run following a stream as it comes,
the core's progress sink, and the plugins reporting through it."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

import pytest

from virtfreeze import runner
from virtfreeze.errors import VirtfreezeError
from virtfreeze.model import DomainRef
from virtfreeze.progress import ByteProgress, Progress, human_bytes
from virtfreeze.targets import progress_to, progress_wanted, report_progress, tree_bytes
from virtfreeze_borg import BorgTarget, log_text, progress_bytes
from virtfreeze_directory import DirectoryTarget
from virtfreeze_restic import status_progress

# Captured on the dev host (Debian 12, borg 1.2.4) from stderr of
#   borg create --json --progress --log-json REPO::a1 .
# in a directory holding a 300 MiB file of random data (big.img) and a small text file.
BORG_CREATE_STDERR = """\
{"original_size": 0, "compressed_size": 0, "deduplicated_size": 0, "nfiles": 0, "path": ".", "time": 1795666171.1513875, "type": "archive_progress", "finished": false}
{"message": "Initializing cache transaction: Reading config", "operation": 1, "msgid": "cache.begin_transaction", "type": "progress_message", "finished": false, "time": 1795666171.1517327}
{"message": "Initializing cache transaction: Reading chunks", "operation": 1, "msgid": "cache.begin_transaction", "type": "progress_message", "finished": false, "time": 1795666171.1518495}
{"message": "Initializing cache transaction: Reading files", "operation": 1, "msgid": "cache.begin_transaction", "type": "progress_message", "finished": false, "time": 1795666171.1519275}
{"operation": 1, "msgid": "cache.begin_transaction", "type": "progress_message", "finished": true, "time": 1795666171.1520016}
{"original_size": 52551703, "compressed_size": 52552434, "deduplicated_size": 52552434, "nfiles": 1, "path": "big.img", "time": 1795666171.3560293, "type": "archive_progress", "finished": false}
{"original_size": 129152476, "compressed_size": 129154540, "deduplicated_size": 129154540, "nfiles": 1, "path": "big.img", "time": 1795666171.556377, "type": "archive_progress", "finished": false}
{"original_size": 194797588, "compressed_size": 194800985, "deduplicated_size": 194800985, "nfiles": 1, "path": "big.img", "time": 1795666171.7578497, "type": "archive_progress", "finished": false}
{"original_size": 259431803, "compressed_size": 259436662, "deduplicated_size": 259436662, "nfiles": 1, "path": "big.img", "time": 1795666171.959516, "type": "archive_progress", "finished": false}
{"time": 1795666172.123068, "type": "archive_progress", "finished": true}
{"message": "Saving files cache", "operation": 2, "msgid": "cache.commit", "type": "progress_message", "finished": false, "time": 1795666172.305062}
{"message": "Saving chunks cache", "operation": 2, "msgid": "cache.commit", "type": "progress_message", "finished": false, "time": 1795666172.305265}
{"message": "Saving cache config", "operation": 2, "msgid": "cache.commit", "type": "progress_message", "finished": false, "time": 1795666172.3089657}
{"operation": 2, "msgid": "cache.commit", "type": "progress_message", "finished": true, "time": 1795666172.3288095}
"""

# Same host and command; the archive name existed already (exit 2), then an unreadable path given
# (a warning, exit 1), both with --progress --log-json.
BORG_EXISTS_STDERR = """\
{"type": "log_message", "time": 1795666175.1665163, "message": "Archive a1 already exists", "levelname": "ERROR", "name": "borg.archiver", "msgid": "Archive.AlreadyExists"}
"""
BORG_WARNING_STDERR = """\
{"message": "Initializing cache transaction: Reading config", "operation": 1, "msgid": "cache.begin_transaction", "type": "progress_message", "finished": false, "time": 1795666176.6809385}
{"operation": 1, "msgid": "cache.begin_transaction", "type": "progress_message", "finished": true, "time": 1795666176.681257}
{"type": "log_message", "time": 1795666177.1794329, "message": "nonexist: [Errno 2] No such file or directory: 'nonexist'", "levelname": "WARNING", "name": "borg.archiver"}
{"message": "Saving files cache", "operation": 2, "msgid": "cache.commit", "type": "progress_message", "finished": false, "time": 1795666177.2096016}
{"operation": 2, "msgid": "cache.commit", "type": "progress_message", "finished": true, "time": 1795666177.2140422}
"""

# Captured on the same host (restic 0.14.0) from stdout of `restic backup --json --tag t src`
# (the same 300 MiB file and text file): the first status lines, the last one, and the summary.
RESTIC_BACKUP_STDOUT = """\
{"message_type":"status","percent_done":0,"total_files":1,"total_bytes":314572800}
{"message_type":"status","percent_done":9.53674307311303e-9,"total_files":2,"files_done":1,"total_bytes":314572803,"bytes_done":3,"current_files":["/src/big.img","/src/small.txt"]}
{"message_type":"status","percent_done":0.0025278885918182826,"total_files":2,"files_done":1,"total_bytes":314572803,"bytes_done":795205,"current_files":["/src/big.img"]}
{"message_type":"status","seconds_elapsed":3,"percent_done":1,"total_files":2,"files_done":2,"total_bytes":314572803,"bytes_done":314572803}
{"message_type":"summary","files_new":2,"files_changed":0,"files_unmodified":0,"dirs_new":1,"dirs_changed":0,"dirs_unmodified":0,"data_blobs":205,"tree_blobs":2,"data_added":314587466,"total_files_processed":2,"total_bytes_processed":314572803,"total_duration":3.058686133,"snapshot_id":"acadc1ac"}
"""


# -- parsers -----------------------------------------------------------------------------------------

def test_borg_progress_lines_give_the_bytes_read():
    got = [b for b in map(progress_bytes, BORG_CREATE_STDERR.splitlines()) if b is not None]
    assert got == [0, 52551703, 129152476, 194797588, 259431803]
    assert progress_bytes("not json at all") is None and progress_bytes("{broken") is None
    assert progress_bytes("[1, 2]") is None


def test_borg_log_text_keeps_the_messages_and_drops_progress():
    assert log_text(BORG_CREATE_STDERR) == ""
    assert log_text(BORG_EXISTS_STDERR) == "Archive a1 already exists"
    assert log_text(BORG_WARNING_STDERR) == "nonexist: [Errno 2] No such file or directory: 'nonexist'"
    plain = "Repository /x does not exist.\nTraceback (most recent call last):\n  {not json"
    assert log_text(plain) == plain  # without --log-json: as it was
    assert runner.last_lines(log_text(BORG_CREATE_STDERR + BORG_EXISTS_STDERR)) == "Archive a1 already exists"


def test_restic_status_lines_give_bytes_done_and_total():
    got = [s for s in map(status_progress, RESTIC_BACKUP_STDOUT.splitlines()) if s is not None]
    assert got == [(0, 314572800), (3, 314572803), (795205, 314572803), (314572803, 314572803)]
    assert status_progress('{"message_type":"status","percent_done":0}') == (0, None)  # still counting
    assert status_progress("status but not json") is None


# -- runner.run following a stream --------------------------------------------------------------------

CHATTY = r"""
import sys
big = "x" * 1000 + "\n"
for i in range(200):
    sys.stdout.write(f"out {i}\n")
    sys.stderr.write(f"err {i}\n")
    sys.stdout.flush(); sys.stderr.flush()
for i in range(5000):  # 5 MB on the other stream: more than any pipe buffer
    sys.{other}.write(big)
sys.{followed}.write("last\n")
"""


@pytest.mark.parametrize("followed,other", [("stderr", "stdout"), ("stdout", "stderr")])
def test_run_follows_one_stream_while_the_other_is_large(followed, other):
    seen = []
    proc = runner.run([sys.executable, "-c", CHATTY.replace("{other}", other).replace("{followed}", followed)],
                      on_line=seen.append, stream=followed)
    mine, theirs = ("err", "out") if followed == "stderr" else ("out", "err")
    assert seen == [f"{mine} {i}" for i in range(200)] + ["last"]
    assert getattr(proc, followed) == "".join(f"{line}\n" for line in seen)
    assert getattr(proc, other) == "".join(f"{theirs} {i}\n" for i in range(200)) + ("x" * 1000 + "\n") * 5000


def test_run_hands_each_line_over_as_it_is_written(tmp_path):
    # The child waits, after each line, until the callback has seen it: only a runner that reads
    # as the command writes gets past the first line.
    r, w = os.pipe()
    child = (f"import os, select, sys\n"
             f"for i in range(3):\n"
             f"    print('line', i, flush=True)\n"
             f"    if not select.select([{r}], [], [], 20)[0]: sys.exit(7)\n"
             f"    os.read({r}, 1)\n")
    seen = []

    def on_line(line):
        seen.append(line)
        os.write(w, b"k")

    try:
        proc = runner.run([sys.executable, "-c", child], on_line=on_line, pass_fds=(r,))
    finally:
        os.close(r)
        os.close(w)
    assert proc.returncode == 0 and seen == ["line 0", "line 1", "line 2"]


def test_run_follows_with_input_and_carriage_returns():
    child = "import sys\ndata = sys.stdin.read()\nsys.stderr.write('a\\rb\\r\\nc')\nprint(len(data))"
    seen = []
    proc = runner.run([sys.executable, "-c", child], input="y" * 300000, on_line=seen.append, stream="stderr")
    assert seen == ["a", "b", "c"] and proc.stdout.strip() == "300000"


def test_failure_message_quotes_stderr_text_never_stdout():
    child = "import sys\nprint('secret-on-stdout')\nsys.stderr.write(sys.argv[1])\nsys.exit(2)"
    with pytest.raises(VirtfreezeError) as err:
        runner.run([sys.executable, "-c", child, BORG_CREATE_STDERR + BORG_EXISTS_STDERR], what="borg create",
                   on_line=lambda line: None, stream="stderr", stderr_text=log_text)
    assert "borg create failed (exit 2): Archive a1 already exists" in str(err.value)
    assert "secret-on-stdout" not in str(err.value)


def test_a_raising_callback_stops_the_command():
    child = "import signal\nprint('one', flush=True)\nsignal.pause()"  # runs until a signal ends it

    def on_line(_line):
        raise RuntimeError("parser bug")

    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="parser bug"):
        runner.run([sys.executable, "-c", child], on_line=on_line)
    assert time.monotonic() - t0 < 30


def test_cancelling_a_followed_command_terminates_it():
    child = "import signal\nprint('one', flush=True)\nsignal.pause()"  # runs until a signal ends it
    with runner.cancel_scope() as scope:
        with pytest.raises(VirtfreezeError, match="stopped: the domain paused"):
            runner.run([sys.executable, "-c", child], what="borg create",
                       on_line=lambda _line: scope.cancel("the domain paused"))


def test_stream_is_stdout_or_stderr():
    with pytest.raises(ValueError):
        runner.run(["true"], on_line=print, stream="both")


# -- the sink ------------------------------------------------------------------------------------------

class Recorder(Progress):
    live = True

    def __init__(self):
        self.lines = []

    def update(self, domain, text):
        self.lines.append((domain, text))


def test_report_progress_goes_to_this_threads_sink_only():
    report_progress(1, 2)  # no one listens: nothing happens
    assert not progress_wanted()
    got, other = [], []
    with progress_to(lambda d, t: got.append((d, t))):
        assert progress_wanted()
        report_progress(5, 10)
        t = threading.Thread(target=lambda: other.append(progress_wanted()))
        t.start()
        t.join()
        with progress_to(None):
            report_progress(6, 10)
        report_progress(7, None)
    assert not progress_wanted()
    assert got == [(5, 10), (7, None)] and other == [False]


def test_byte_progress_shows_size_total_and_rate_throttled():
    now = [100.0]
    shown = Recorder()
    sink = ByteProgress(shown, "web1", "archiving to nightly", clock=lambda: now[0])
    sink(0, 4 << 30)
    for i in range(1, 11):
        now[0] += 0.1
        sink(i * (85 << 20) // 10, 4 << 30)  # 85 MiB/s
    assert shown.lines[0] == ("web1", "archiving to nightly: 0 B of 4.0 GiB")
    assert len(shown.lines) == 4  # at 0, 0.3, 0.6, 0.9 s: at most every 0.25 s
    assert shown.lines[-1] == ("web1", "archiving to nightly: 76.5 MiB of 4.0 GiB, 85.0 MiB/s")
    now[0] += 0.01
    sink(4 << 30, 4 << 30)  # done: shown at once, and once (restic repeats its last status)
    sink(4 << 30, 4 << 30)
    assert shown.lines[-1][1].startswith("archiving to nightly: 4.0 GiB of 4.0 GiB, ") and len(shown.lines) == 5
    now[0] += 1
    sink(3 << 30, None)
    assert shown.lines[-1][1].startswith("archiving to nightly: 3.0 GiB, ")


def test_byte_progress_never_raises():
    class Broken(Progress):
        def update(self, domain, text):
            raise OSError("terminal gone")

    ByteProgress(Broken(), "web1", "archiving to x")(1, 2)


def test_human_bytes():
    assert [human_bytes(n) for n in (0, 1023, 1024, 1536, 85 << 20, 3 << 30, 5 << 40, 2048 << 40)] == [
        "0 B", "1023 B", "1.0 KiB", "1.5 KiB", "85.0 MiB", "3.0 GiB", "5.0 TiB", "2048.0 TiB"]


# -- plugins reporting ----------------------------------------------------------------------------------

def export_view(tmp_path: Path) -> Path:
    export = tmp_path / "export"
    (export / "disks").mkdir(parents=True)
    (export / "disks" / "vda.raw").write_bytes(os.urandom(3 << 20) + b"\0" * (1 << 20))
    (export / "manifest.json").write_text(json.dumps({"sizes": {"disks/vda.raw": 4 << 20}}))
    return export


def test_directory_target_reports_the_bytes_it_copied(tmp_path):
    export = export_view(tmp_path)
    (tmp_path / "target").mkdir()
    got = []
    with progress_to(lambda d, t: got.append((d, t))):
        result = DirectoryTarget("dir", {"path": str(tmp_path / "target")}).archive(DomainRef("web1", "u"), export, {})
    total = tree_bytes(export)
    assert got[-1] == (result.bytes, total) == (total, total)
    assert [d for d, _t in got] == sorted(d for d, _t in got) and len(got) >= 4


FAKE_BORG = r"""#!{python}
import json, sys
with open({log!r}, "a") as fh:
    fh.write(json.dumps(sys.argv[1:]) + "\n")
if "--log-json" in sys.argv:
    for n in (0, 1 << 20, 3 << 20):
        sys.stderr.write(json.dumps({{"type": "archive_progress", "original_size": n, "finished": False}}) + "\n")
    sys.stderr.write(json.dumps({{"type": "archive_progress", "finished": True}}) + "\n")
if "fail" in sys.argv[-2]:
    sys.stderr.write(json.dumps({{"type": "log_message", "levelname": "ERROR", "message": "Failed to create/acquire the lock"}})
                     + "\n" if "--log-json" in sys.argv else "Failed to create/acquire the lock\n")
    sys.exit(2)
print(json.dumps({{"archive": {{"stats": {{"original_size": 4 << 20}}}}}}))
"""


def fake_borg(tmp_path: Path) -> tuple[Path, Path]:
    log = tmp_path / "borg-argv.log"
    prog = tmp_path / "borg"
    prog.write_text(FAKE_BORG.format(python=sys.executable, log=str(log)))
    prog.chmod(0o755)
    return prog, log


def test_borg_asks_for_progress_only_when_someone_listens(tmp_path):
    prog, log = fake_borg(tmp_path)
    export = export_view(tmp_path)
    target = BorgTarget("nightly", {"repository": str(tmp_path / "repo"), "borg": str(prog)})
    ref = DomainRef("web1", "u")
    assert target.archive(ref, export, {}).bytes == 4 << 20
    got = []
    with progress_to(lambda d, t: got.append((d, t))):
        assert target.archive(ref, export, {}).bytes == 4 << 20
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert "--progress" not in calls[0] and "--log-json" not in calls[0]
    assert calls[1][:6] == ["--lock-wait", "3600", "create", "--json", "--progress", "--log-json"]  # waits its turn
    assert got == [(0, tree_bytes(export)), (1 << 20, tree_bytes(export)), (3 << 20, tree_bytes(export))]


@pytest.mark.parametrize("listening", [False, True])
def test_borg_failure_says_the_message_with_or_without_log_json(tmp_path, listening):
    prog, _log = fake_borg(tmp_path)
    target = BorgTarget("nightly", {"repository": str(tmp_path / "fail-repo"), "borg": str(prog)})
    with progress_to((lambda d, t: None) if listening else None), pytest.raises(VirtfreezeError) as err:
        target.archive(DomainRef("web1", "u"), export_view(tmp_path), {})
    assert "borg create failed (exit 2): Failed to create/acquire the lock" in str(err.value)
    assert "{" not in str(err.value)
