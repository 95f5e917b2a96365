"""Check that every acknowledged guest write is present in a disk image."""

from __future__ import annotations

import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

SECTOR = 512
MAGIC = b"VFREC "


def _read_raw(image: Path, fmt: str) -> bytes:
    if fmt == "raw":
        return Path(image).read_bytes()
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        raw = Path(tmp) / "image.raw"
        subprocess.run(
            ["qemu-img", "convert", "-U", "-f", fmt, "-O", "raw", str(image), str(raw)],
            check=True, capture_output=True,
        )
        return raw.read_bytes()


def image_format(image: Path) -> str:
    with open(image, "rb") as fh:
        return "qcow2" if fh.read(4) == b"QFI\xfb" else "raw"


def records_in(image: Path, disk: str, fmt: str | None = None) -> tuple[int, dict[int, int]]:
    """(number of slots, slot -> sequence number) of the records for `disk` in `image`."""
    data = _read_raw(Path(image), fmt or image_format(Path(image)))
    tag = disk.encode()
    found: dict[int, int] = {}
    off = data.find(MAGIC)
    while off >= 0:
        if off % SECTOR == 0:
            parts = data[off:off + 64].split(b"\n", 1)[0].split()
            if len(parts) == 3 and parts[1] == tag and parts[2].isdigit():
                found[off // SECTOR] = int(parts[2])
        off = data.find(MAGIC, off + 1)
    return len(data) // SECTOR, found


@dataclass
class IntegrityReport:
    disk: str
    image: Path
    checked: int
    missing: list[int]

    @property
    def ok(self) -> bool:
        return not self.missing

    def __str__(self) -> str:
        if self.ok:
            return f"{self.disk} in {self.image}: all {self.checked} acknowledged records present"
        head = ", ".join(map(str, self.missing[:10]))
        return (f"{self.disk} in {self.image}: {len(self.missing)} of {self.checked} acknowledged "
                f"records missing (first: {head})")


def check_image(image: Path, disk: str, acked: list[int], fmt: str | None = None,
                stride: int = 1) -> IntegrityReport:
    """Every acknowledged sequence number must be in its slot (or overwritten by a later one)."""
    nslots, found = records_in(image, disk, fmt)
    missing = []
    for seq in acked:
        slot = (seq * stride) % nslots
        have = found.get(slot)
        if have is None or have < seq or ((have - seq) * stride) % nslots:
            missing.append(seq)
    return IntegrityReport(disk=disk, image=Path(image), checked=len(acked), missing=missing)


def corrupt_record(image_raw: Path, slot: int) -> None:
    """Overwrite one record in a raw image with zeros (for the negative test)."""
    with open(image_raw, "r+b") as fh:
        fh.seek(slot * SECTOR)
        fh.write(b"\0" * SECTOR)
        fh.flush()
        os.fsync(fh.fileno())
