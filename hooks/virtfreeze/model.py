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
    backing: tuple = ()  # the base's own backing chain, nearest first: (file, format) pairs

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "DiskPlan":
        return cls(**dict(data, backing=tuple(tuple(b) for b in data.get("backing", ()))))
