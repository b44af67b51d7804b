# Every target installs what it needs into .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
MODEL ?= default
PROMPT ?= The capital of France is
PROMPT_IDS ?=
TOKENS ?= 32
PORT ?= 8000
PYTEST_ARGS ?=
TEST_WORKERS ?= 2
BENCH_ARGS ?=

FUZZ_EXAMPLES ?= 500
LOAD_CLIENTS ?= 32
LOAD_SECONDS ?= 120

.PHONY: test run generate bench peers fuzz load clean

# pip byte-compiles what it installs: with PYTHONDONTWRITEBYTECODE set (as on this kind of
# machine) nothing compiled later is kept, and every process would compile torch again.
PIP_INSTALL := $(PY) -m pip install --quiet

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first: the CPU wheel on this kind of machine; later installs must not replace it.
	$(PIP_INSTALL) torch==2.13.0
	$(PIP_INSTALL) -e '.[test,ray]'
	# The GPTQ oracle for the tests: gptqmodel's metadata asks for a newer torch, so it goes in
	# without its dependencies, beside the few it needs; the constraint keeps this torch.
	echo "torch==2.13.0+cpu" > $(VENV)/constraints.txt
	$(PIP_INSTALL) -c $(VENV)/constraints.txt device-smi pypcre tokenicer logbar defuser dill pillow
	$(PIP_INSTALL) --no-deps -c $(VENV)/constraints.txt gptqmodel==7.7.0
	touch $(STAMP)

# The playground's browser test drives Debian's Chromium: Playwright's own browser download
# cannot reach its host from this kind of machine. Without root (or apt) the install is
# left out and that test says so: it fails in CI, and is skipped loudly elsewhere.
CHROMIUM := /usr/bin/chromium
$(CHROMIUM):
	-apt-get update -qq && apt-get install -y -qq chromium

# pytest's own script, not `python -m pytest`: that would put the checkout on sys.path, where
# kernels/ shadows the `kernels` distribution that transformers (>= 5.25) looks for and imports.
# Two workers (pytest-xdist), a test file each at a time so that its module fixtures (servers,
# checkpoints, a Ray cluster) are made once; TEST_WORKERS=0 runs in this process.
test: $(STAMP) $(CHROMIUM)
	$(VENV)/bin/pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# The fuzzer of the suite (tests/test_fuzz.py), with many more examples per route and mode.
fuzz: $(STAMP)
	FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(VENV)/bin/pytest -s tests/test_fuzz.py $(PYTEST_ARGS)

# The load test of the suite (tests/test_load.py) at full size: 32 streaming clients, 2 minutes.
load: $(STAMP)
	LOAD_CLIENTS=$(LOAD_CLIENTS) LOAD_SECONDS=$(LOAD_SECONDS) $(VENV)/bin/pytest -s tests/test_load.py $(PYTEST_ARGS)

run: $(STAMP)
	$(VENV)/bin/llama-ref fetch default
	$(VENV)/bin/llama-ref serve --model "$(MODEL)" --host 127.0.0.1 --port $(PORT)

generate: $(STAMP)
	$(VENV)/bin/llama-ref generate --model "$(MODEL)" $(if $(PROMPT_IDS),--prompt-ids "$(PROMPT_IDS)",--prompt "$(PROMPT)") --max-new-tokens $(TOKENS)

# llama.cpp is the peer the benchmark runs beside ours; pip builds it from source once per
# venv (about 8 minutes on 2 cores) for this CPU, as conform/peers.py builds llama-server (no
# AMX). Not from pip's wheel cache: a wheel built for another CPU can crash on this one.
bench: $(STAMP)
	$(PY) -c "import llama_cpp" 2>/dev/null || { \
	  args=$$($(PY) -c 'import shlex; from llama_ref.conform.peers import NATIVE_OPTIONS as o; print(shlex.join(o))') \
	  && CMAKE_ARGS="$$args" $(PY) -m pip install --no-cache-dir llama-cpp-python==0.3.36; }
	$(VENV)/bin/llama-ref bench $(BENCH_ARGS)

# The conformance kit's peers (docs/conformance.md): llama.cpp's llama-server built with cmake
# and llama-cpp-python's server in a venv of its own, once, under $LLAMA_REF_HOME/peers.
peers: $(STAMP)
	$(PY) -m llama_ref.conform.peers

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
