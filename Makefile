# tm4: the two quick-start targets are `make lab` (tm4's main job) and `make test`.
PY := .venv/bin/python
PYTEST_ARGS ?=

.PHONY: deps lab demo test test-future lint bench wheel dist install uninstall sounds clean

deps:
	./scripts/install-deps.sh

lab: deps
	$(PY) -m tm4.cli lab

demo: lab

test: deps
	.venv/bin/ruff check src tests bench
	.venv/bin/lint-imports --no-cache
	CI=$${CI:-true} $(PY) -m pytest -q $(PYTEST_ARGS)

# The same suite a year from now: the process clock moves, the kernel's does not, so a
# fixed date that reaches nft, ipset, SQLite "now" or file times shows up here.
test-future: deps
	CI=$${CI:-true} faketime -f '+365d' $(PY) -m pytest -q $(PYTEST_ARGS)

lint: deps
	.venv/bin/ruff check src tests bench
	.venv/bin/lint-imports --no-cache

sounds:
	./scripts/render-sounds.sh

bench: deps
	for b in bench/*.py; do $(PY) $$b || exit 1; done

# The wheel: tm4 with what a PBX needs as package data (AGI entry point, dialplan, prompts,
# systemd units, the example config). `dist` alone builds it with the .venv's setuptools.
wheel: deps
	$(MAKE) dist

dist:
	rm -rf dist build
	$(PY) -m pip wheel -q --no-deps --no-build-isolation -w dist .

# Puts tm4 on this host for real, from the wheel: a venv of its own in $(PREFIX), then
# `tm4 install` (AGI launcher, prompts, dialplan, systemd units, config skeleton, links in
# /usr/local/bin). Nothing points into this checkout afterwards.
# Debian's python3: Asterisk's user must be able to run the venv's interpreter.
PREFIX ?= /opt/tm4
SYSTEM_PYTHON ?= /usr/bin/python3
DESTDIR ?= /
install: wheel
	test -x $(PREFIX)/bin/python || $(SYSTEM_PYTHON) -m venv $(PREFIX)
	$(PREFIX)/bin/pip install -q dist/tm4-*.whl
	$(PREFIX)/bin/pip install -q --force-reinstall --no-deps dist/tm4-*.whl
	$(PREFIX)/bin/tm4 install --root $(DESTDIR)

uninstall:
	$(PREFIX)/bin/tm4 uninstall --root $(DESTDIR)

clean:
	rm -rf .venv build dist *.egg-info src/*.egg-info .pytest_cache
