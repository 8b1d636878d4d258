# `make test`: create .venv if missing, install torch (CPU build pinned) and danlu[test,bench], run the suite.
# `make demo`: the same install, then `danlu compare` on its default suite (report in danlu-report/).
PYTHON ?= python3
VENV   ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: test demo install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[test,bench]"
	touch $@

install: $(VENV)/.installed

test: install
	$(BIN)/python -m pytest -q

demo: install
	$(BIN)/danlu compare --out danlu-report

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
