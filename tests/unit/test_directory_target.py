"""The directory target: copies, lists, checks and extracts; two runs in one second get two archives."""

import json

from virtfreeze.model import DomainRef
from virtfreeze_directory import DirectoryTarget


def test_two_archives_of_one_domain_in_the_same_second(tmp_path, monkeypatch):
    import virtfreeze_directory

    monkeypatch.setattr(virtfreeze_directory, "archive_name", lambda domain: f"{domain}-2026-01-01T00:00:00Z")
    export = tmp_path / "export"
    (export / "disks").mkdir(parents=True)
    (export / "disks" / "vda.raw").write_bytes(b"\0" * 4096 + b"data")
    (export / "manifest.json").write_text(json.dumps({"sizes": {"disks/vda.raw": 4100}}))
    (tmp_path / "target").mkdir()
    t = DirectoryTarget("dir", {"path": str(tmp_path / "target")})
    ref = DomainRef("web1", "u1")
    first, second = t.archive(ref, export, {}), t.archive(ref, export, {})
    assert first.archive != second.archive and first.bytes == second.bytes == 4100 + len((export / "manifest.json").read_text())
    assert t.list_archives(ref) == sorted([first.archive, second.archive])
    assert t.contents(second.archive) == {"disks/vda.raw": 4100, "manifest.json": (export / "manifest.json").stat().st_size}
    out = t.extract(second.archive, tmp_path / "out")
    assert (out / "disks" / "vda.raw").read_bytes() == (export / "disks" / "vda.raw").read_bytes()
