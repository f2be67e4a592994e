# tm4: the two quick-start targets are `make lab` (tm4's main job) and `make test`.
PY := .venv/bin/python
PYTEST_ARGS ?=

.PHONY: deps lab demo test lint bench install sounds clean

deps:
	./scripts/install-deps.sh

lab: deps
	$(PY) -m tm4.cli lab

demo: lab

test: deps
	.venv/bin/ruff check src tests bench
	CI=$${CI:-true} $(PY) -m pytest -q $(PYTEST_ARGS)

lint: deps
	.venv/bin/ruff check src tests bench

bench: deps
	for b in bench/*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf .venv build *.egg-info .pytest_cache
