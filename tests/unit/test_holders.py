"""Which run holds a freeze: this process's session is alive; a reused pid, another boot or a gone
session is not."""

import dataclasses
import os
import subprocess
import sys

from virtfreeze import holders


def _ancestors() -> list[int]:
    pid, seen = os.getpid(), []
    while pid > 0:
        seen.append(pid)
        pid = holders._parent_of(pid) or 0
    return seen


def test_this_run_is_alive_and_the_same_run_as_itself():
    me = holders.current()
    assert me.sid == (os.getsid(0) or _ancestors()[-2]) and me.started > 0 and holders.alive(me)
    assert me.same_run(holders.current())


def test_a_session_outside_the_pid_namespace_is_the_top_visible_ancestor(monkeypatch):
    # In a container the session id is often 0: its leader is not in this PID namespace. Every
    # process would then be one run that never ends; the top-most visible ancestor is the job instead.
    monkeypatch.setattr(os, "getsid", lambda pid: 0)
    me = holders.current()
    chain = _ancestors()
    assert me.sid in chain and me.sid != 1 and holders._parent_of(me.sid) in (0, 1)
    assert me.started > 0 and holders.alive(me) and me.same_run(holders.current())


def test_a_reused_pid_another_boot_or_a_gone_session_holds_nothing():
    me = holders.current()
    assert not holders.alive(dataclasses.replace(me, started=me.started + 1))  # the pid now is another process
    assert not holders.alive(dataclasses.replace(me, boot="another-boot"))
    assert not me.same_run(dataclasses.replace(me, started=me.started + 1))
    # A session that ended: its leader's start time is recorded, the leader is gone.
    out = subprocess.run([sys.executable, "-c", "import json, os, sys; sys.path[:0] = sys.argv[1:]\n"
                          "from virtfreeze import holders; print(json.dumps(holders.current().to_json()))",
                          *sys.path], capture_output=True, text=True, start_new_session=True, check=True)
    import json

    gone = holders.Holder.from_json(json.loads(out.stdout))
    assert gone.sid != me.sid and not holders.alive(gone)


def test_a_session_whose_leader_had_exited_lives_while_any_member_does():
    me = holders.current()
    assert holders.alive(dataclasses.replace(me, started=0))  # this process is a member
    assert not holders.alive(dataclasses.replace(me, sid=2 ** 22 + 7, started=0))  # no such session
