"""Plain records shared by the freeze path, the thaw path and the plugins."""

from __future__ import annotations

import glob
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

    @property
    def _rounds_prefix(self) -> str:
        return self.overlay[: -len(".virtfreeze.qcow2")] + ".virtfreeze-"

    def round_overlay(self, n: int) -> str:
        """The overlay of round n of an iterative merge (round 1 is `overlay` itself)."""
        return self.overlay if n <= 1 else f"{self._rounds_prefix}{n}.qcow2"

    def round_of(self, path: str | None) -> int | None:
        """Which round's overlay `path` is (1: `overlay` itself), or None when it is not this disk's."""
        if not path:
            return None
        if path == self.overlay:
            return 1
        head = self._rounds_prefix
        n = path[len(head):-len(".qcow2")]
        return int(n) if path.startswith(head) and path.endswith(".qcow2") and n.isdigit() else None

    def is_ours(self, path: str | None) -> bool:
        """Whether `path` is this disk's overlay or one of its iterative rounds."""
        return self.round_of(path) is not None

    def overlays_on_disk(self) -> list[str]:
        """This disk's overlay files that exist, oldest round first."""
        found = glob.glob(glob.escape(self._rounds_prefix[: -len("-")]) + "*.qcow2")
        return sorted((f for f in found if self.is_ours(f)), key=self.round_of)

    @classmethod
    def from_json(cls, data: dict) -> "DiskPlan":
        return cls(**dict(data, backing=tuple(tuple(b) for b in data.get("backing", ()))))


@dataclass
class MergeResult:
    """What a merge plugin did: the strategy used and what stopping the guest cost."""

    strategy: str
    offline_bytes: int = 0  # overlay bytes merged while the guest was stopped
    rounds: int = 0  # live rounds of an iterative merge
    stopped_seconds: float = 0.0  # how long virtfreeze kept the guest from running
    note: str | None = None  # what else a person should know (e.g. a live commit that did not converge)
