"""The one block-job waiter: which events end a wait, filtered by disk, and what a reconnect re-reads.

libvirt is replaced by a stand-in that only answers the three questions the waiter asks
(alive, block_job, xml); the events are fed as libvirt's event thread would."""

import queue

import pytest

from virtfreeze.errors import VirtfreezeError
from virtfreeze.libvirt_boundary import (
    JOB_CANCELED, JOB_COMPLETED, JOB_FAILED, JOB_READY, JOB_TYPE_ACTIVE_COMMIT, Hypervisor,
)

XML_READY = "<domain><devices><disk><target dev='vda'/><mirror ready='yes'/></disk></devices></domain>"
XML_NO_JOB = "<domain><devices><disk><target dev='vda'/></disk></devices></domain>"


class StandIn(Hypervisor):
    def __init__(self, jobs=None, xml=XML_NO_JOB, alive=True):
        self.generation = 0
        self.jobs = jobs or {}
        self.live_xml = xml
        self.up = alive
        self.reconnects = 0

    def alive(self):
        return self.up

    def reconnect(self, seen_generation=None):
        self.reconnects += 1
        self.generation += 1
        self.up = True

    def block_job(self, uuid, name, target):
        return self.jobs.get(target, {})

    def xml(self, uuid, name, inactive=False):
        return self.live_xml


def events(*items):
    q = queue.Queue()
    for item in items:
        q.put(item)
    return q


def test_ready_ends_on_ready_of_its_own_disk_only():
    hv = StandIn(jobs={"vda": {"type": JOB_TYPE_ACTIVE_COMMIT}})
    q = events(("vdb", 0, JOB_READY), ("vda", 0, JOB_READY))
    hv.wait_for_jobs("u", "web1", {"vda"}, q, until="ready", timeout=5)
    assert q.empty()


def test_ready_of_a_job_already_ready_needs_no_event():
    StandIn(xml=XML_READY).wait_for_jobs("u", "web1", {"vda"}, events(), until="ready", timeout=5)


def test_completed_waits_past_ready_and_for_every_disk():
    hv = StandIn()
    q = events(("vda", 0, JOB_READY), ("vda", 0, JOB_COMPLETED), ("vdb", 0, JOB_COMPLETED))
    hv.wait_for_jobs("u", "web1", {"vda", "vdb"}, q, until="completed", timeout=5)
    assert q.empty()


@pytest.mark.parametrize("status,word", [(JOB_FAILED, "failed"), (JOB_CANCELED, "was cancelled")])
def test_a_failed_job_raises_with_its_disk(status, word):
    with pytest.raises(VirtfreezeError) as e:
        StandIn().wait_for_jobs("u", "web1", {"vda"}, events(("vda", 0, status)), until="completed", timeout=5)
    assert word in str(e.value) and "disk vda" in str(e.value)


def test_gone_accepts_the_cancel_it_asked_for():
    hv = StandIn(jobs={"vda": {"type": 1}})
    hv.wait_for_jobs("u", "web1", {"vda"}, events(("vda", 0, JOB_CANCELED)), until="gone", timeout=5)


def test_after_a_reconnect_the_state_is_read_not_awaited():
    hv = StandIn(jobs={}, alive=False)  # libvirtd went away; the job finished meanwhile (event lost)
    hv.wait_for_jobs("u", "web1", {"vda"}, events(), until="completed", timeout=5)
    assert hv.reconnects == 1


def test_a_ready_job_that_vanished_while_libvirtd_was_away_raises():
    hv = StandIn(jobs={}, xml=XML_NO_JOB, alive=False)
    with pytest.raises(VirtfreezeError, match="vanished"):
        # not ready at the start (a mirror appears once the job runs), then gone after the reconnect
        hv.wait_for_jobs("u", "web1", {"vda"}, events(), until="ready", timeout=5)


def test_bounded():
    hv = StandIn(jobs={"vda": {"type": JOB_TYPE_ACTIVE_COMMIT, "cur": 1, "end": 2}})
    with pytest.raises(VirtfreezeError, match="not ready to pivot after 0.01s"):
        hv.wait_for_jobs("u", "web1", {"vda"}, events(), until="ready", timeout=0.01)
