"""Config validation, domain selection, and the journal's durability rules."""

import json
import os
import stat
from pathlib import Path

import pytest

from virtfreeze import config
from virtfreeze.errors import ConfigError, DomainBusy, DomainNotFound, UsageError, VirtfreezeError
from virtfreeze.export_view import domain_dir_name
from virtfreeze.holders import Holder
from virtfreeze.journal import FrozenDomain, Journal, domain_lock, write_atomic
from virtfreeze.model import DiskPlan
from virtfreeze.libvirt_boundary import DomainInfo
from virtfreeze.selection import select


def test_every_option_has_description_and_example():
    def walk(schema, where):
        for key, sub in schema.get("properties", {}).items():
            assert sub.get("description"), f"{where}{key} has no description"
            assert "example" in sub, f"{where}{key} has no example"
            walk(sub, f"{where}{key}.")
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            walk(extra, f"{where}*.")
    walk(config.SCHEMA, "")


def test_examples_validate():
    example = {k: v["example"] for k, v in config.SCHEMA["properties"].items()}
    cfg = config.parse(example)
    assert cfg.domains["db1"].exclude_disks == ["vdb"]
    assert cfg.overlay_directory == Path("/var/lib/virtfreeze/overlays")


def test_unknown_keys_are_named(tmp_path):
    with pytest.raises(ConfigError) as e:
        config.parse({"jobz": 3})
    assert "'jobz'" in str(e.value) and "jobs" in str(e.value)
    with pytest.raises(ConfigError) as e:
        config.parse({"domains": {"web": {"memmory": True}}})
    assert "'memmory'" in str(e.value) and "domains.web" in str(e.value)
    with pytest.raises(ConfigError) as e:
        config.parse({"quiesce": "sometimes"})
    assert "quiesce" in str(e.value)


def test_config_file_default_optional_explicit_required(tmp_path, monkeypatch):
    monkeypatch.setattr(config, "DEFAULT_CONFIG", tmp_path / "absent.yaml")
    assert config.load(None).jobs == 4
    with pytest.raises(ConfigError):
        config.load(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("jobs: [unclosed")
    with pytest.raises(ConfigError) as e:
        config.load(bad)
    assert "not valid YAML" in str(e.value)


def test_uri_precedence(monkeypatch):
    cfg = config.parse({"connect": "qemu:///session"})
    monkeypatch.delenv("LIBVIRT_DEFAULT_URI", raising=False)
    assert cfg.uri(None) == "qemu:///session"
    monkeypatch.setenv("LIBVIRT_DEFAULT_URI", "test:///default")
    assert cfg.uri(None) == "test:///default"
    assert cfg.uri("qemu:///system") == "qemu:///system"


DOMS = [DomainInfo(n, f"u-{n}", "running", True) for n in ("web-1", "web-2", "db", "scratch-1", "a[1]")]


def names(ds):
    return [d.name for d in ds]


def test_selection_names_globs_all_and_exclude():
    cfg = config.parse({"exclude": ["scratch-*", "web-2"]})
    assert names(select(DOMS, ["db"], False, cfg)) == ["db"]
    assert names(select(DOMS, ["web-*"], False, cfg)) == ["web-1"]
    assert names(select(DOMS, ["web-2"], False, cfg)) == ["web-2"]  # an exact name wins over exclude
    assert names(select(DOMS, [], True, cfg)) == ["a[1]", "db", "web-1"]
    assert names(select(DOMS, ["a[1]"], False, cfg)) == ["a[1]"]  # exact before glob


def test_selection_errors():
    cfg = config.parse({"include": ["db", "web-*"], "exclude": ["db"]})
    assert names(select(DOMS, [], False, cfg)) == ["web-1", "web-2"]
    with pytest.raises(DomainNotFound):
        select(DOMS, ["nope"], False, cfg)
    with pytest.raises(DomainNotFound):
        select(DOMS, ["nope-*"], False, cfg)
    with pytest.raises(UsageError):
        select(DOMS, [], False, config.parse({}))
    with pytest.raises(UsageError):
        select(DOMS, ["db"], True, cfg)


def test_journal_roundtrip_and_mode(tmp_path):
    j = Journal(tmp_path)
    plan = DiskPlan("vda", "/v/a.qcow2", "qcow2", "file", "/v/a.qcow2.virtfreeze.qcow2", (("/t.qcow2", "qcow2"),))
    j.write(FrozenDomain("u1", "web", "freezing", disks=[plan], skipped={"hdc": "device is a cdrom"}))
    loaded = j.load("u1")
    assert loaded == FrozenDomain("u1", "web", "freezing", disks=[plan], skipped={"hdc": "device is a cdrom"})
    assert json.loads(j.path("u1").read_text())["version"] == 2
    assert stat.S_IMODE(os.stat(j.path("u1")).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(j.dir).st_mode) == 0o700
    assert [r.uuid for r in j.all()] == ["u1"]
    j.remove("u1")
    j.remove("u1")  # idempotent
    assert j.load("u1") is None and j.all() == []
    assert [p.name for p in j.dir.iterdir()] == []  # no temp files left


def test_another_configs_journal_is_found_through_the_host_wide_index(tmp_path):
    index = tmp_path / "index"
    a, b = Journal(tmp_path / "a", index_dir=index), Journal(tmp_path / "b", index_dir=index)
    holder = Holder(4242, 7, "boot", "2026-11-26T01:00:00+00:00", "borgmatic create")
    a.write(FrozenDomain("u1", "web", "frozen", holders=[holder]))
    state_dir, rec = b.elsewhere("u1")
    assert state_dir == tmp_path / "a" and rec.holders == [holder] and rec.name == "web"
    assert a.elsewhere("u1") is None  # its own record is not "elsewhere"
    assert stat.S_IMODE(os.stat(index).st_mode) == 0o700
    a.remove("u1")
    assert b.elsewhere("u1") is None and not (index / "u1").exists()
    # The newest writer owns the entry; the older one's removal leaves it alone.
    a.write(FrozenDomain("u2", "db", "frozen"))
    b.write(FrozenDomain("u2", "db", "frozen"))
    a.remove("u2")
    assert (index / "u2").read_text() == str(b.path("u2")) and a.elsewhere("u2")[0] == tmp_path / "b"
    # An entry naming a file that is gone, or not a journal record at all, names nobody.
    b.path("u2").unlink()
    assert a.elsewhere("u2") is None
    (index / "u3").write_text("/etc/passwd")
    assert a.elsewhere("u3") is None


def test_journal_note_writes_only_changes(tmp_path):
    j = Journal(tmp_path)
    rec = FrozenDomain("u1", "web", "frozen")
    j.write(rec)
    before = os.stat(j.path("u1")).st_ino
    j.note(rec, paused_by_virtfreeze=None, phase="frozen")  # nothing changes: nothing written
    assert os.stat(j.path("u1")).st_ino == before
    j.note(rec, paused_by_virtfreeze=True)
    assert os.stat(j.path("u1")).st_ino != before and j.load("u1").paused_by_virtfreeze is True
    with pytest.raises(TypeError):
        j.note(rec, paused_by_virtfrezee=True)  # a typo is a bug, not a silent new key


def test_journal_of_version_1_is_migrated_and_a_newer_one_refused(tmp_path):
    j = Journal(tmp_path)
    j.dir.mkdir(parents=True)
    old = {"uuid": "u1", "name": "web", "phase": "thawing", "version": 1, "started": "2026-01-01T00:00:00+00:00",
           "disks": [{"target": "vda", "base": "/v/a.raw", "base_format": "raw", "base_type": "file",
                      "overlay": "/v/a.raw.virtfreeze.qcow2"}],
           "saved_by_virtfreeze": "running", "iterative_empty": None, "some_old_key": 1}
    j.path("u1").write_text(json.dumps(old))
    rec = j.load("u1")
    assert rec.phase == "thawing" and rec.disks[0].overlay == "/v/a.raw.virtfreeze.qcow2"
    assert rec.saved_by_virtfreeze == "running" and rec.iterative_empty == {} and rec.disks[0].backing == ()
    j.path("u1").write_text(json.dumps(dict(old, version=99)))
    with pytest.raises(VirtfreezeError, match="newer virtfreeze"):
        j.load("u1")
    j.path("u1").write_text(json.dumps(dict(old, disks=[{"target": "vda"}])))
    with pytest.raises(VirtfreezeError, match="damaged"):
        j.load("u1")


def test_write_atomic_never_leaves_a_partial_file(tmp_path):
    target = tmp_path / "f.json"
    write_atomic(target, json.dumps({"a": 1}).encode())
    with pytest.raises(TypeError):
        write_atomic(target, None)  # fails mid-way
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]


def test_domain_lock_is_exclusive(tmp_path):
    with domain_lock("u1", "web", lock_dir=tmp_path):
        with pytest.raises(DomainBusy) as e:
            with domain_lock("u1", "web", lock_dir=tmp_path):
                pass
        assert "'web'" in str(e.value)
        with domain_lock("u2", "db", lock_dir=tmp_path):
            pass
    with domain_lock("u1", "web", lock_dir=tmp_path):
        pass


def test_domain_lock_waits_for_a_run_that_lets_go(tmp_path):
    import threading

    held, release = threading.Event(), threading.Event()

    def other_run():
        with domain_lock("u1", "web", lock_dir=tmp_path):
            held.set()
            release.wait(10)

    t = threading.Thread(target=other_run)
    t.start()
    held.wait(10)
    with pytest.raises(DomainBusy, match="waited 0.05s"):
        with domain_lock("u1", "web", lock_dir=tmp_path, wait=0.05):
            pass
    threading.Timer(0.1, release.set).start()  # the other run lets go while this one waits
    with domain_lock("u1", "web", lock_dir=tmp_path, wait=10):
        assert release.is_set()
    t.join()


def test_export_dir_name_cannot_escape():
    assert domain_dir_name("web 1 $(x)", "u") == "web 1 $(x)"
    for bad in ("..", ".", "a/b", ""):
        assert domain_dir_name(bad, "uuid-1") == "uuid-1"


def test_contrib_example_config_is_valid(monkeypatch):
    from virtfreeze.plugins import get_plugin_manager
    from virtfreeze.targets import load_targets

    example = Path(__file__).resolve().parents[2] / "contrib" / "virtfreeze.yaml"
    cfg = config.load(example)
    assert cfg.domains["db1"].quiesce == "require" and cfg.exclude == ["scratch-*"]
    monkeypatch.delenv("VIRTFREEZE_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    targets = load_targets(cfg.targets, get_plugin_manager(), str(example))  # each against its plugin's schema
    assert {t.name: t.type for t in targets.values()} == {"nightly": "borg", "offsite": "restic"}


def test_target_settings_are_checked_against_the_plugin_schema(monkeypatch):
    from virtfreeze.plugins import get_plugin_manager
    from virtfreeze.targets import load_targets

    monkeypatch.delenv("VIRTFREEZE_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    pm = get_plugin_manager()
    with pytest.raises(ConfigError) as e:
        load_targets({"t": {"type": "borg", "repository": "/r", "compresion": "lz4"}}, pm)
    assert "'compresion'" in str(e.value) and "compression" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_targets({"t": {"type": "restic"}}, pm)
    assert "'repository' is a required property" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_targets({"t": {"type": "restic", "repository": "/r", "password_env": "P", "password_command": ["x"]}}, pm)
    assert "set only one of password_env, password_command" in str(e.value)
    assert load_targets({"t": {"type": "borg", "repository": "/r", "passphrase_env": "P"}}, pm)["t"].type == "borg"
    with pytest.raises(ConfigError) as e:
        load_targets({"t": {"type": "tape"}}, pm)
    assert "'tape'" in str(e.value) and "borg, directory, restic" in str(e.value)


def test_every_target_setting_has_description_and_example(monkeypatch):
    from virtfreeze.plugins import get_plugin_manager
    from virtfreeze.targets import target_types

    monkeypatch.delenv("VIRTFREEZE_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    types = target_types(get_plugin_manager())
    assert set(types) >= {"borg", "restic", "directory"}
    for name, cls in types.items():
        schema = cls.schema
        assert schema.get("additionalProperties") is False, f"{name}: unknown keys must be rejected"
        for key, sub in schema["properties"].items():
            assert sub.get("description") and "example" in sub, f"target type {name}: {key}"


def test_target_types_are_objects_in_a_table_the_core_owns():
    import pluggy

    from virtfreeze import hookspecs
    from virtfreeze.hookspecs import hookimpl
    from virtfreeze.targets import StorageTarget, load_targets, target_types

    class Tape(StorageTarget):
        type = "tape"
        schema = {"type": "object", "additionalProperties": False, "required": ["device"],
                  "properties": {"device": {"type": "string", "description": "d", "example": "/dev/st0"}}}

    class Plugin:
        @hookimpl
        def virtfreeze_register_targets(self, register):
            register(Tape)

    pm = pluggy.PluginManager("virtfreeze")
    pm.add_hookspecs(hookspecs)
    pm.register(Plugin(), name="tape")
    assert target_types(pm) == {"tape": Tape}
    t = load_targets({"nightly": {"type": "tape", "device": "/dev/st0"}}, pm)["nightly"]
    assert isinstance(t, Tape) and (t.name, t.settings) == ("nightly", {"device": "/dev/st0"})
    assert t.contents("any") is None  # a target that cannot list: reported as not verified

    class Clash:
        @hookimpl
        def virtfreeze_register_targets(self, register):
            register(type("OtherTape", (StorageTarget,), {"type": "tape", "schema": Tape.schema}))

    pm.register(Clash(), name="clash")
    with pytest.raises(ConfigError, match="two plugins register the target type 'tape'"):
        target_types(pm)
    pm.unregister(name="clash")

    class NotATarget:
        @hookimpl
        def virtfreeze_register_targets(self, register):
            register(dict)

    pm.register(NotATarget(), name="bad")
    with pytest.raises(ConfigError, match="not a StorageTarget"):
        target_types(pm)


def test_mountinfo_escapes_are_undone():
    from virtfreeze.export_view import unescape_mountinfo

    assert unescape_mountinfo(r"/run/x/vf\040t\040\134q\011") == "/run/x/vf t \\q\t"
    assert unescape_mountinfo("/run/x/dömäin") == "/run/x/dömäin"


def test_secrets_failures_name_the_path(tmp_path, monkeypatch):
    from virtfreeze.errors import VirtfreezeError
    from virtfreeze.targets import secret_env

    with pytest.raises(VirtfreezeError) as e:
        secret_env({"passphrase_file": str(tmp_path / "absent.pass")}, "passphrase", "BORG_PASSPHRASE")
    assert str(tmp_path / "absent.pass") in str(e.value) and "passphrase_file" in str(e.value)
    with pytest.raises(VirtfreezeError) as e:
        secret_env({"password_command": [str(tmp_path / "no-such-program")]}, "password", "RESTIC_PASSWORD")
    assert "password_command" in str(e.value)
    (tmp_path / "ok.pass").write_text("s3cret\n")
    assert secret_env({"passphrase_file": str(tmp_path / "ok.pass")}, "passphrase", "X") == {"X": "s3cret"}
    monkeypatch.delenv("NOT_SET_ANYWHERE", raising=False)
    with pytest.raises(VirtfreezeError):
        secret_env({"passphrase_env": "NOT_SET_ANYWHERE"}, "passphrase", "X")


def test_command_line_beats_domain_setting_beats_global():
    from virtfreeze.config import parse

    cfg = parse({"memory": True, "quiesce": "auto", "strategy": "live",
                 "domains": {"db1": {"memory": False, "quiesce": "require", "strategy": "iterative"}}})
    # the domain's own setting over the global one
    e = cfg.effective("db1")
    assert (e.memory, e.quiesce, e.strategy) == (False, "require", "iterative")
    assert set(e.sources.values()) == {"domain setting"}
    # the command line over both, for each setting alone
    assert cfg.effective("db1", quiesce="off").quiesce == "off"
    assert cfg.effective("db1", memory=True).memory is True
    assert cfg.effective("db1", strategy="offline").strategy == "offline"
    e = cfg.effective("db1", memory=False, quiesce="off", strategy="live")
    assert (e.memory, e.quiesce, e.strategy) == (False, "off", "live")
    assert set(e.sources.values()) == {"command line"}
    # no domain setting: the global one, and --no-memory (False) still counts as given
    e = cfg.effective("web1")
    assert (e.memory, e.quiesce, e.strategy) == (True, "auto", "live")
    assert e.sources == {"memory": "configuration", "quiesce": "configuration", "strategy": "configuration"}
    assert cfg.effective("web1", memory=False).memory is False


def test_journal_records_that_cannot_be_read_are_reported_not_raised(tmp_path):
    """What behind-guests reads: it runs the tool whatever the journal holds."""
    journal = Journal(tmp_path)
    journal.dir.mkdir(parents=True)
    (journal.dir / "damaged.json").write_text("{")
    errors: list[Exception] = []
    assert journal.readable(errors.append) == []
    assert len(errors) == 1 and "damaged.json" in str(errors[0])
    assert Journal(tmp_path / "none").readable(errors.append) == [] and len(errors) == 1  # none yet: no error
