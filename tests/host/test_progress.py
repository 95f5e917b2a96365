"""Archive progress: `virtfreeze backup` under a pseudo-terminal shows the bytes each target has read
(borg, restic and directory) with the rate; without a terminal nothing is drawn, borg is not asked
for progress output, and the log has one summary line per archive."""

from __future__ import annotations

import os
import re

import pytest

from tests.host.conftest import VIRTFREEZE
from tests.host.helpers import assert_all_acked_present, assert_back_on_base, on_a_terminal
from tests.host.test_backup import ANSI, targets_config
from tests.rig.guest import DiskSpec

pytestmark = pytest.mark.host

DATA_MIB = 384  # random data on a second disk: long enough an archive that progress is drawn
SIZE = r"[0-9.]+ (?:B|[KMGT]iB)"


def guest_with_data(guest_factory):
    """A writing guest with a raw disk full of random data (written before it starts)."""
    g = guest_factory([DiskSpec("vda"), DiskSpec("vdb", "raw", size_mib=DATA_MIB, writes=False)], start=False)
    with open(g.disks["vdb"], "r+b") as fh:
        for _ in range(DATA_MIB):
            fh.write(os.urandom(1 << 20))
    g.start()
    return g


def summary_lines(text: str, target: str) -> list[str]:
    return re.findall(rf"archived to {target} as \S+ \({SIZE}, [0-9.]+ s, {SIZE}/s\)", text)


def test_archive_progress_on_a_terminal_and_one_summary_line_without(guest_factory, vf, tmp_path):
    g = guest_with_data(guest_factory)
    vf.write_config(targets=targets_config(tmp_path))
    env = vf.env(TEST_BORG_PASSPHRASE="borg-secret", TERM="xterm-256color", COLUMNS="160", LINES="30")
    env.pop("VIRTFREEZE_DISABLE_PLUGIN_AUTOLOAD")  # the targets are entry-point plugins
    targets = ("borg", "restic", "dir")

    code, text = on_a_terminal([*VIRTFREEZE, "--config", str(vf.config_path), "backup", g.name], env)
    assert code == 0, text
    fragments = [f.strip() for f in re.split(r"[\r\n]", ANSI.sub("\n", text)) if f.strip()]
    for t in targets:
        drawn = [f for f in fragments if re.fullmatch(
            rf"{g.name} +archiving to {t}: {SIZE} of {SIZE}(, {SIZE}/s)?", f)]
        assert any(re.search(r" [0-9.]+ [KMG]iB of ", f) for f in drawn), (t, fragments)
        assert any(re.search(r", [0-9.]+ [KMG]iB/s$", f) for f in drawn), (t, drawn)  # with a rate
        assert len(summary_lines(ANSI.sub("", text), t)) == 1, text
    assert "{" not in text, text  # no JSON record of borg's came through

    # Without a terminal: nothing drawn, borg not asked for progress records, one summary line each.
    out = vf("-v", "backup", g.name, env=env)
    assert "\x1b[" not in out.stderr + out.stdout
    assert "archiving to" not in out.stderr
    creates = [line for line in out.stderr.splitlines()
               if "running" in line and "'borg'," in line and "'create'" in line]
    assert len(creates) == 1 and "--progress" not in creates[0] and "--log-json" not in creates[0], creates
    for t in targets:
        assert len(summary_lines(out.stderr, t)) == 1, out.stderr
        assert len(re.findall(rf"archived to {t} as ", out.stderr)) == 1, out.stderr

    assert_back_on_base(g, vf)
    assert_all_acked_present(g)
