# Two commands for users: `make demo` (install + run the end-to-end demo) and `make test`.
# Both install into ./.venv first; a second run skips the install unless pyproject.toml changed.

SHELL  := /bin/bash
# pipefail: pip's own exit status must survive the filter of its noise below
.SHELLFLAGS := -o pipefail -c
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# torch is pinned here, not in pyproject.toml: 2.13.0 is the CPU wheel this machine keeps on
# disk; an unpinned torch would pull a multi-GB CUDA build. CUDA users install their own first.
TORCH  ?= torch==2.13.0
PIP    := $(BIN)/python -m pip --disable-pip-version-check

.PHONY: install demo test lint unit docs bench tools clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q "$(TORCH)" 2>&1 | { grep -v "^WARNING: Location" || true; }
	$(PIP) install -q -e ".[dev,demo,docs]" 2>&1 | { grep -v "^WARNING: Location" || true; }
	@$(BIN)/python -c "import torch, transformers, fastapi, pytest" || { echo "install failed"; exit 1; }
	@touch $(STAMP)

install: $(STAMP)

# Debian's docker-compose validates the compose file in the tests (no engine needed).
# Best effort: without root/apt those tests skip and say why.
tools:
	@command -v docker-compose >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
		&& (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose >/dev/null) \
		|| echo "note: docker-compose not installed; compose validation tests will skip"; }

demo: install
	$(BIN)/student-trainer demo $(if $(DATA),--data $(DATA))

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

unit: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The documentation site (MkDocs Material) into site/; --strict: a broken link or page fails.
docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

test: install tools lint docs unit

bench: install
	$(BIN)/python benchmarks/bench_server.py
	$(BIN)/python benchmarks/bench_kd.py
	$(BIN)/python benchmarks/bench_codec.py --layers 13

clean:
	rm -rf $(VENV) site .pytest_cache .mypy_cache .ruff_cache .hypothesis
