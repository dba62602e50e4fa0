PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-dev

.PHONY: test demo venv clean

venv: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

## make test: create .venv, install, run the whole suite
test: $(STAMP)
	$(PY) -m pytest

## make demo: create .venv, install, then a guided tour in a throwaway sandbox (.demo/)
demo: $(STAMP)
	$(PY) scripts/demo.py

clean:
	rm -rf $(VENV) .demo .bench .pytest_cache
