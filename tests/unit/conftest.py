"""Unit tests keep to their own directories: the journal's host-wide index goes to a temporary one."""

import pytest


@pytest.fixture(autouse=True)
def _private_journal_index(tmp_path, monkeypatch):
    from virtfreeze import journal

    monkeypatch.setattr(journal, "INDEX_DIR", tmp_path / "journal-index")
