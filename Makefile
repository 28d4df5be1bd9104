# scratchllm — the commands a user needs. `make quickstart` and `make test` are the setup contract.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed
RUNTIME := $(VENV)/.runtime
# The CPU build of torch lies on local disk; a looser pin would pull a multi-GB CUDA build.
TORCH_PIN ?= torch==2.13.0
export SCRATCHLLM_TEST_DATA ?= $(abspath ../shared/data)

.PHONY: install quickstart test bench lint format clean interop

# The runtime alone (what quickstart needs), then the dev tools on top (what test needs).
$(RUNTIME): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q "$(TORCH_PIN)"
	$(PIP) install -q -e .
	touch $(RUNTIME)

$(STAMP): $(RUNTIME)
	$(PIP) install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

quickstart: $(RUNTIME)
	$(VENV)/bin/scratchllm quickstart --out runs/quickstart

# The web chat test drives Debian's chromium + chromedriver: install them when missing (as root,
# with apt). This never fails the build; without them the browser test skips and says why.
.PHONY: browser
browser:
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing chromium + chromium-driver for the web chat test (apt-get)"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	      chromium chromium-driver) >/dev/null 2>&1 \
	      || echo "warning: apt-get could not install chromium; the web chat test will skip" >&2; \
	  else \
	    echo "warning: no chromium and no root apt-get to install it; the web chat test will skip" >&2; \
	  fi; \
	fi

# pytest exits 5 when it collected no tests: treat that as a failure, not a pass.
test: $(STAMP) browser
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(PY) -m pytest -q -p no:cacheprovider tests; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

# llama.cpp for the GGUF parity tests and the inference benchmark's llama.cpp rows: built from
# llama-cpp-python's PyPI source with this machine's compiler (tens of minutes on 2 cores, once:
# pip keeps the built wheel in its cache). Never part of `make test`'s default path.
LLAMA_CPP_PIN ?= llama-cpp-python==0.3.36
interop: $(STAMP)
	$(PY) -c "import llama_cpp" 2>/dev/null || \
	  CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(PIP) install -v "$(LLAMA_CPP_PIN)" > $(VENV)/llama-build.log 2>&1 \
	  || { tail -30 $(VENV)/llama-build.log; exit 1; }
	SCRATCHLLM_REQUIRE_LLAMA_CPP=1 $(PY) -m pytest -q -p no:cacheprovider tests/test_llama_cpp.py

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

format: $(STAMP)
	$(VENV)/bin/ruff format src tests benchmarks
	$(VENV)/bin/ruff check --fix src tests benchmarks

clean:
	rm -rf $(VENV) runs build dist src/*.egg-info
