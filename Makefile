# tm4: the two quick-start targets are `make lab` (tm4's main job) and `make test`.
PY := .venv/bin/python
PYTEST_ARGS ?=

.PHONY: deps lab demo test test-future lint bench install sounds clean

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

# Puts tm4 on this host for real: commands, systemd units, config skeleton, state dir,
# and the dial-in pieces for Asterisk (AGI script, prompts, dialplan context).
install: deps
	ln -sf $(CURDIR)/.venv/bin/tm4 /usr/local/bin/tm4
	ln -sf $(CURDIR)/.venv/bin/tm4d /usr/local/bin/tm4d
	$(PY) -m tm4.cli install-service --tm4d /usr/local/bin/tm4d
	install -d /var/lib/asterisk/agi-bin
	ln -sf $(CURDIR)/agi-bin/tm4-dialin.agi /var/lib/asterisk/agi-bin/tm4-dialin.agi
	install -d /var/lib/asterisk/sounds/en/tm4
	install -m 0644 sounds/en/* /var/lib/asterisk/sounds/en/tm4/
	install -D -m 0644 dialplan/extensions_tm4.conf /etc/asterisk/extensions_tm4.conf

clean:
	rm -rf .venv build *.egg-info .pytest_cache
