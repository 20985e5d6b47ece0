# The README's two commands: `make demo` and `make test`. Each creates .venv when it is
# missing and installs the project into it (re-installs only when pyproject.toml changed).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint bench quality cascade clean-demo

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) -m scripts.demo --output-dir runs/demo

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider tests

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) -m scripts.benchmark

# the end-to-end quality benchmark (scripts/quality.py): ~40 min on 2 CPU cores, report in runs/quality
quality: $(STAMP)
	$(PY) -m scripts.quality --output-dir runs/quality

cascade: $(STAMP)
	$(PY) -m scripts.cascade --output-dir runs/cascade
