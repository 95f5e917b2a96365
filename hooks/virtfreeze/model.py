"""Plain records shared by the freeze path, the thaw path and the plugins."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class DomainRef:
    name: str
    uuid: str


@dataclass(frozen=True)
class DiskPlan:
    """One frozen disk: the overlay the guest writes into, and the base it goes back to."""

    target: str
    base: str
    base_format: str
    base_type: str  # 'file' or 'block'
    overlay: str

    def to_json(self) -> dict:
        return asdict(self)
