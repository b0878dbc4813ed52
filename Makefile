# proxytune: `make demo` runs the pipeline locally, `make test` runs the tests.
# Both create the virtual environment on first use (torch's CPU wheel first, then the project).

VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1

.PHONY: help install demo test compile lint clean

help:  ## list the targets
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==$(TORCH_VERSION)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install proxytune with its dev tools

demo: $(STAMP)  ## run the pipeline locally on the example subject (tiny models, CPU)
	$(BIN)/proxytune run --local

test: $(STAMP)  ## run the test suite (starts its own S3 and MLflow servers on 127.0.0.1)
	$(BIN)/python -m pytest --durations=15

compile: $(STAMP)  ## compile the pipeline to proxy-tuning.yaml
	$(BIN)/proxytune compile -o proxy-tuning.yaml

lint: $(STAMP)  ## ruff lint and format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:  ## remove the demo's work folder and caches (keeps .venv)
	rm -rf proxytune-work proxy-tuning.yaml .pytest_cache .ruff_cache
