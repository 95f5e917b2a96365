"""Log records that carry their domain and disk, added once instead of in every message.

`domain_log(log, "web1", "vda").info("live commit of %s", path)` gives a
record with `domain` and `disk` attributes; the CLI's formatter writes them
in front of the message ("domain 'web1' disk vda: live commit of ...").
"""

from __future__ import annotations

import logging


class DomainLog(logging.LoggerAdapter):
    """A logger bound to one domain (and disk): every record gets `domain` and `disk`."""

    def process(self, msg, kwargs):
        kwargs["extra"] = {**self.extra, **kwargs.get("extra", {})}
        return msg, kwargs


def domain_log(logger: logging.Logger, domain: str, disk: str | None = None) -> DomainLog:
    return DomainLog(logger, {"domain": domain, "disk": disk})


def context_of(record: logging.LogRecord) -> str:
    """"domain 'web1' disk vda: " for a record made through a DomainLog, else ""."""
    domain = getattr(record, "domain", None)
    if domain is None:
        return ""
    disk = getattr(record, "disk", None)
    return f"domain {domain!r}" + (f" disk {disk}" if disk else "") + ": "
