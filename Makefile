# Everything installs itself: only Python 3.12 (and make) must be on the machine.
SHELL := /bin/bash
export UV_PYTHON_DOWNLOADS := never
# mypy's cache is kept per machine, like uv's: a new checkout checks only what differs from the last
# one (mypy compares each file's hash), instead of a minute re-reading pandas' and Prefect's stubs.
export MYPY_CACHE_DIR ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/marketpipe/mypy

UV := $(shell command -v uv 2>/dev/null || echo .tools/bin/uv)

.PHONY: install demo test drills pictures lint format clean

.tools/bin/uv:
	python3 -m venv .tools
	.tools/bin/pip install --quiet --disable-pip-version-check uv

.venv/.synced: uv.lock pyproject.toml | $(UV)
	$(UV) sync --frozen --compile-bytecode  # imports load compiled code even where Python may not write it
	touch $@

install: .venv/.synced

demo: install
	$(UV) run --frozen python -m flows.demo

lint: install
	$(UV) run --frozen ruff check .
	$(UV) run --frozen ruff format --check .
	$(UV) run --frozen mypy

# Two workers for the suite (most of its time is spent waiting on servers and child processes), then
# the tests that measure a pace, alone.
test: lint
	$(UV) run --frozen pytest -n 2 -m "not serial and not drill"
	$(UV) run --frozen pytest -m "serial and not drill"

# Fault drills against the real parts; each prints what it injected and what survived, then the table.
drills: install
	$(UV) run --frozen pytest tests/drills -m drill

# The README's pictures (docs/images), from replayed real Yahoo responses into influxd and DuckDB.
pictures: install
	$(UV) run --frozen python -m tests.pictures docs/images

format: install
	$(UV) run --frozen ruff format .
	$(UV) run --frozen ruff check --fix .

clean:
	rm -rf .venv .tools .pytest_cache .mypy_cache .ruff_cache data
