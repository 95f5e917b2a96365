# The README's commands. Each prepares the host first (idempotent).
VENV ?= $(CURDIR)/.venv
PY := $(VENV)/bin/python
JOBS ?= 2

.PHONY: prepare demo test test-unit bench deb

prepare:
	bash scripts/prepare-host.sh

## demo: a throwaway writing VM backed up into a local borg repository, end to end
demo: prepare
	$(PY) scripts/demo.py

## test: the whole suite, unit and host tests (real libvirtd + QEMU guests)
test: prepare
	$(PY) -m pytest -n $(JOBS) tests

## test-unit: the fast tests only (no libvirt needed)
test-unit:
	$(PY) -m pytest tests/unit

## bench: benchmarks that print figures (not part of the test suite)
bench: prepare
	$(PY) bench/freeze_thaw.py
	$(PY) bench/downtime.py
	$(PY) bench/archive.py
	$(PY) bench/block_view.py
	$(PY) bench/libvirt_calls.py
	$(PY) bench/restore.py
	$(PY) bench/memory_freeze.py
	$(PY) bench/incremental.py
	$(PY) bench/peers.py
	$(PY) bench/contention.py
	$(PY) bench/removal.py

## deb: the Debian package (build/deb/virtfreeze_<version>_all.deb), built with Debian's tools, lintian-checked
deb:
	bash scripts/build-deb.sh
