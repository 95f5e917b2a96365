"""Listing a target's archives and extracting part of one: archive names taken apart, the directory
target's listing, partial extract and refusal of symlinks; restic's listing parsed (borg for real is a host
test, tests/host/test_borg_listing.py)."""

import json
import shutil
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from virtfreeze.errors import VirtfreezeError
from virtfreeze.model import DomainRef
from virtfreeze.targets import (
    ArchiveInfo, StorageTarget, archive_name, parse_archive_name, relative_paths, utc_time,
)
from virtfreeze_directory import DirectoryTarget, copy_tree

WHEN = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)


def make_export(where: Path, domain: str = "web-1") -> Path:
    """A directory laid out like an export view."""
    (where / "disks").mkdir(parents=True)
    (where / "domain.xml").write_text(f"<domain><name>{domain}</name></domain>")
    (where / "manifest.json").write_text(json.dumps({"domain": domain}))
    (where / "disks" / "vda.qcow2").write_bytes(b"\0" * 8192 + b"data")
    return where


def tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


@pytest.mark.parametrize("domain", ["web1", "web-1", "a-b-c", "db-2025-01-01T00:00:00Z", "x.2", "-"])
def test_archive_names_parse_back_to_their_domain_and_time(domain):
    assert parse_archive_name(archive_name(domain, WHEN)) == (domain, "2026-01-02T03:04:05Z", 1)


def test_the_directory_targets_collision_suffix_is_the_number():
    assert parse_archive_name("web-1-2026-01-02T03:04:05Z.2") == ("web-1", "2026-01-02T03:04:05Z", 2)
    assert parse_archive_name("web-1-2026-01-02T03:04:05Z.12") == ("web-1", "2026-01-02T03:04:05Z", 12)


@pytest.mark.parametrize("name", ["web1", "web1-2026-01-02", "-2026-01-02T03:04:05Z", "web1-2026-13-02T03:04:05Z",
                                  "web1-2026-01-02T03:04:05Z.partial", "web1-2026-01-02T03:04:05", "borgmatic-host"])
def test_other_names_are_not_archives(name):
    assert parse_archive_name(name) is None


def test_times_are_utc_whole_seconds():
    assert utc_time(datetime(2026, 1, 2, 4, 4, 5, 999999, tzinfo=timezone(timedelta(hours=1)))) \
        == "2026-01-02T03:04:05Z"


def test_extract_paths_stay_inside_the_archive():
    assert relative_paths(["./manifest.json", "disks/", "manifest.json", "a/../domain.xml"]) \
        == ["manifest.json", "disks", "domain.xml"]
    for bad in ["/etc/passwd", "../x", "disks/../../x", ".", "", "a/.."]:
        with pytest.raises(VirtfreezeError):
            relative_paths([bad])
    with pytest.raises(TypeError):
        relative_paths("manifest.json")


def test_list_archives_is_picked_from_archives_by_exact_domain():
    class Fake(StorageTarget):
        type, schema = "fake", {}

        def archives(self):
            return [ArchiveInfo("f", "1", "web", "2026-01-01T00:00:00Z"),
                    ArchiveInfo("f", "2", "web-1", "2026-01-01T00:00:01Z"),
                    ArchiveInfo("f", "3", "web", "2026-01-01T00:00:02Z", 10)]

    t = Fake("f", {})
    assert t.list_archives(DomainRef("web", "u")) == ["1", "3"]
    assert t.list_archives(DomainRef("web-1", "u")) == ["2"]
    assert t.archives()[2].to_json() == {"target": "f", "archive": "3", "domain": "web",
                                         "time": "2026-01-01T00:00:02Z", "size": 10}


@pytest.fixture
def directory_target(tmp_path, monkeypatch):
    """A directory target holding archives of web-1 (two in one second), web and db-2."""
    import virtfreeze_directory

    export = make_export(tmp_path / "export")
    root = tmp_path / "target"
    root.mkdir()
    t = DirectoryTarget("dir", {"path": str(root)})
    for domain, second in [("web-1", 7), ("web-1", 7), ("web", 5), ("db-2", 9)]:
        monkeypatch.setattr(virtfreeze_directory, "archive_name",
                            lambda d, s=second: archive_name(d, WHEN.replace(second=s)))
        t.archive(DomainRef(domain, "u"), export, {})
    (root / ".web-2026-01-02T03:04:10Z.partial").mkdir()  # an unfinished copy
    (root / "notes.txt").write_text("not an archive")
    (root / "web-2026-01-02T03:04:11Z").symlink_to(root / "web-2026-01-02T03:04:05Z")
    return t


def test_directory_target_lists_every_archive_oldest_first(directory_target):
    size = 8192 + 4 + len(json.dumps({"domain": "web-1"})) + len("<domain><name>web-1</name></domain>")
    assert [a.to_json() for a in directory_target.archives()] == [
        {"target": "dir", "archive": "web-2026-01-02T03:04:05Z", "domain": "web", "time": "2026-01-02T03:04:05Z",
         "size": size},
        {"target": "dir", "archive": "web-1-2026-01-02T03:04:07Z", "domain": "web-1",
         "time": "2026-01-02T03:04:07Z", "size": size},
        {"target": "dir", "archive": "web-1-2026-01-02T03:04:07Z.2", "domain": "web-1",
         "time": "2026-01-02T03:04:07Z", "size": size},
        {"target": "dir", "archive": "db-2-2026-01-02T03:04:09Z", "domain": "db-2", "time": "2026-01-02T03:04:09Z",
         "size": size},
    ]
    assert directory_target.list_archives(DomainRef("web", "u")) == ["web-2026-01-02T03:04:05Z"]
    assert directory_target.list_archives(DomainRef("web-1", "u")) == ["web-1-2026-01-02T03:04:07Z",
                                                                        "web-1-2026-01-02T03:04:07Z.2"]


def test_directory_target_without_its_directory_names_it(tmp_path):
    with pytest.raises(VirtfreezeError) as e:
        DirectoryTarget("dir", {"path": str(tmp_path / "gone")}).archives()
    assert e.value.path == str(tmp_path / "gone")


def test_directory_target_extracts_only_the_paths_asked_for(directory_target, tmp_path):
    archive = "web-1-2026-01-02T03:04:07Z.2"
    out = directory_target.extract(archive, tmp_path / "meta", paths=["manifest.json", "domain.xml", "nvram.fd"])
    assert tree(out) == ["domain.xml", "manifest.json"]
    assert json.loads((out / "manifest.json").read_text()) == {"domain": "web-1"}
    assert tree(directory_target.extract(archive, tmp_path / "disks", paths=["disks"])) == ["disks", "disks/vda.qcow2"]
    assert tree(directory_target.extract(archive, tmp_path / "one", paths=["disks/vda.qcow2"])) \
        == ["disks", "disks/vda.qcow2"]
    assert tree(directory_target.extract(archive, tmp_path / "none", paths=[])) == []
    assert tree(directory_target.extract(archive, tmp_path / "all")) \
        == ["disks", "disks/vda.qcow2", "domain.xml", "manifest.json"]


def test_directory_target_checks_the_checksums_of_what_it_extracts(directory_target, tmp_path):
    archive = Path(directory_target.settings["path"]) / "web-1-2026-01-02T03:04:07Z"
    (archive / "domain.xml").write_text("<domain>tampered</domain>")
    assert tree(directory_target.extract(archive.name, tmp_path / "ok", paths=["manifest.json"])) == ["manifest.json"]
    with pytest.raises(VirtfreezeError, match="checksum mismatch in domain.xml"):
        directory_target.extract(archive.name, tmp_path / "bad", paths=["manifest.json", "domain.xml"])


@pytest.mark.parametrize("where", ["disks/vda.qcow2", "disks/extra", "manifest.json", "SHA256SUMS", "disks"])
def test_directory_target_refuses_an_archive_holding_a_symlink(directory_target, tmp_path, where):
    archive = Path(directory_target.settings["path"]) / "web-2026-01-02T03:04:05Z"
    secret = tmp_path / "host-secret"
    secret.write_text("not for the archive")
    link = archive / where
    shutil.rmtree(link) if link.is_dir() else link.unlink(missing_ok=True)
    link.symlink_to(secret)
    for paths in (None, ["domain.xml"]):  # refused even when the link is not among the paths asked for
        dest = tmp_path / f"out-{paths is None}"
        with pytest.raises(VirtfreezeError, match="symlink") as e:
            directory_target.extract(archive.name, dest, paths=paths)
        assert e.value.path == str(link)
        assert not dest.exists()  # refused before anything was copied


def test_directory_target_refuses_an_archive_that_is_a_symlink(directory_target, tmp_path):
    with pytest.raises(VirtfreezeError, match="symlink"):
        directory_target.extract("web-2026-01-02T03:04:11Z", tmp_path / "out")


def test_copy_tree_never_follows_a_symlink(tmp_path):
    secret = tmp_path / "host-secret"
    secret.write_text("not for the copy")
    src = make_export(tmp_path / "src")
    (src / "disks" / "vdb.qcow2").symlink_to(secret)
    with pytest.raises(VirtfreezeError, match="symlink") as e:
        copy_tree(src, tmp_path / "dst")
    assert e.value.path == str(src / "disks" / "vdb.qcow2")
    assert not (tmp_path / "dst" / "disks" / "vdb.qcow2").exists()
    (src / "disks" / "vdb.qcow2").unlink()
    (src / "linked").symlink_to(tmp_path, target_is_directory=True)
    with pytest.raises(VirtfreezeError, match="symlink"):
        copy_tree(src, tmp_path / "dst2")


def test_restic_lists_virtfreeze_snapshots_in_utc_oldest_first(tmp_path):
    from virtfreeze_restic import ResticTarget

    snapshots = [  # as restic 0.14 prints them (local time with its offset, nanoseconds), newest first
        {"time": "2026-01-02T04:04:06.123456789+01:00", "short_id": "bbbb2222", "tags": ["virtfreeze", "domain=web-1"]},
        {"time": "2026-01-02T03:04:05.5+00:00", "short_id": "aaaa1111", "tags": ["virtfreeze", "domain=web"]},
        {"time": "2026-01-01T00:00:00Z", "short_id": "cccc3333", "tags": ["virtfreeze"]},  # tagged by hand
    ]
    fake = tmp_path / "restic"
    fake.write_text(f"#!/bin/sh\n[ \"$*\" = 'snapshots --json --tag virtfreeze' ] && echo '{json.dumps(snapshots)}'\n")
    fake.chmod(0o755)
    t = ResticTarget("r", {"repository": str(tmp_path / "repo"), "restic": str(fake)})
    assert [a.to_json() for a in t.archives()] == [
        {"target": "r", "archive": "aaaa1111", "domain": "web", "time": "2026-01-02T03:04:05Z", "size": None},
        {"target": "r", "archive": "bbbb2222", "domain": "web-1", "time": "2026-01-02T03:04:06Z", "size": None},
    ]
    assert t.list_archives(DomainRef("web", "u")) == ["aaaa1111"]
