"""Built-in merge plugin: `qemu-img commit` for a domain that is not running.

Handles a domain shut down (or destroyed, or undefined) between freeze and
thaw: each overlay is committed into its recorded base, then the persistent
definition is pointed back at the base. Registered `trylast`, so the live
merge gets running domains first.
"""

from __future__ import annotations

import logging
import os

from virtfreeze import qemu_img
from virtfreeze.domain_xml import parse_disks
from virtfreeze.hookspecs import hookimpl
from virtfreeze.journal import failpoint
from virtfreeze.libvirt_boundary import MISSING, SHUTOFF

log = logging.getLogger(__name__)


@hookimpl(trylast=True)
def virtfreeze_merge(hv, domain, disks, config):
    state = hv.state(domain.uuid)
    if state not in (SHUTOFF, MISSING):
        return None
    defined = {}
    if state != MISSING:
        defined = {d.target: d.source for d in parse_disks(hv.xml(domain.uuid, domain.name, inactive=True))}
    for disk in disks:
        if not os.path.exists(disk.overlay):
            continue
        if defined.get(disk.target) == disk.base:
            continue  # committed and re-pointed by an earlier run; the overlay is spent
        log.info("domain %r disk %s: offline commit of %s into %s", domain.name, disk.target,
                 disk.overlay, disk.base)
        qemu_img.commit(disk.overlay, disk.base, domain=domain.name, disk=disk.target)
        failpoint("thaw-offline-committed")
    return "offline"
