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

    def round_overlay(self, n: int) -> str:
        """The overlay of round n of an iterative merge (round 1 is `overlay` itself)."""
        return self.overlay if n <= 1 else self.overlay[: -len(".virtfreeze.qcow2")] + f".virtfreeze-{n}.qcow2"

    def is_ours(self, path: str | None) -> bool:
        """Whether `path` is this disk's overlay or one of its iterative rounds."""
        if not path:
            return False
        stem = self.overlay[: -len(".virtfreeze.qcow2")]
        return path == self.overlay or (path.startswith(stem + ".virtfreeze-") and path.endswith(".qcow2")
                                        and path[len(stem) + 12:-6].isdigit())

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
