# `make test`: create .venv if missing, install torch (CPU build pinned) and danlu[test,bench], run the suite.
# `make demo`: the same install, then `danlu compare` on its default suite (report in danlu-report/).
# `make lint`: ruff and mypy with the settings in pyproject.toml (CI runs it after the tests).
# `make docs`: the documentation site, built strictly into site/, then its page test (math in Chromium).
PYTHON ?= python3
VENV   ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: test demo install lint docs clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	echo "$(TORCH_SPEC)" > $(VENV)/constraints.txt  # no dependency may replace the pinned (CPU) torch
	$(BIN)/python -m pip install --quiet -c $(VENV)/constraints.txt -e ".[test,bench]"
	# timm without its torchvision (PyPI's does not import beside the CPU torch): the registry tests
	$(BIN)/python -m pip install --quiet -c $(VENV)/constraints.txt --no-deps "timm>=1.0.12"
	touch $@

install: $(VENV)/.installed

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check src tests examples
	$(BIN)/mypy

docs: install
	$(BIN)/python -m pip install --quiet -c $(VENV)/constraints.txt -e ".[docs]"
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict -d site
	$(BIN)/python -m pytest -q tests/test_docs.py

demo: install
	$(BIN)/danlu compare --out danlu-report

clean:
	rm -rf $(VENV) build dist site src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
