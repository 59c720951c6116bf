# Two entry points, each self-contained on a machine with python3, pip and make:
#   make demo   run examples/quickstart.py against a real MCP server it starts itself, then
#               examples/exactly_once.py: raw MCP with naive retries vs rmcp_actors, under crashes
#   make test   lint, format check, type check, the test suite (reference servers included) and
#               make conformance
#   make bench  the benchmarks (full runs, ~35 min): results in benchmarks/results/, plots, README table
#   make conformance  the official MCP conformance suite (Node 22 and the suite from npm, cached in
#               $TMPDIR/rmcp-npm-cache) against conformance/client.py and conformance/server.py,
#               in a loopback-only network namespace (unshare -rn); see docs/conformance.md
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test bench conformance clean

$(STAMP): pyproject.toml
	# Debian-style Pythons may lack the venv module: fall back to virtualenv from PyPI.
	$(PYTHON) -m venv $(VENV) || { $(PYTHON) -m pip install --user --quiet virtualenv && $(PYTHON) -m virtualenv $(VENV); }
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,demo,bench]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/quickstart.py
	$(PY) examples/exactly_once.py

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/pyright
	$(VENV)/bin/pytest -n auto --durations=15
	# Last line: "client scenarios passed: N/M"; fails on a scenario outside conformance/expected-failures.txt.
	$(PY) scripts/conformance.py

# Full runs, for an idle machine; each writes benchmarks/results/<name>.json, then plot.py draws the
# PNGs beside them and rewrites README.md's table of figures from them.
bench: $(STAMP)
	$(PY) benchmarks/overhead.py
	$(PY) benchmarks/server_overhead.py
	$(PY) benchmarks/alternatives.py
	$(PY) benchmarks/large_payloads.py --json benchmarks/results/large_payloads.json
	$(PY) benchmarks/scale.py
	$(PY) benchmarks/chaos.py
	$(PY) benchmarks/transfer.py --traced
	$(PY) benchmarks/plot.py --readme

conformance: $(STAMP)
	$(PY) scripts/conformance.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
