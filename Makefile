# Everything a fresh machine needs: `make demo` and `make test` install first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is pinned exactly: an unpinned torch pulls a multi-GB CUDA build.
PIP_CONSTRAINT_FILE := constraints.txt

.PHONY: install demo test bench-install clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c $(PIP_CONSTRAINT_FILE) torch==2.13.0
	$(BIN)/pip install --quiet -c $(PIP_CONSTRAINT_FILE) -e ".[test]"
	touch $@

demo: install
	$(BIN)/cnnmod demo

test: install
	$(BIN)/python -m pytest -q

bench-install: install
	$(BIN)/pip install --quiet -c $(PIP_CONSTRAINT_FILE) -e ".[bench]"

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
