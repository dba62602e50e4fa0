PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-dev

.PHONY: test check demo venv clean

venv: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

## make test: create .venv, install, lint (ruff), then the whole suite (CI runs this)
test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest

## make check: lint, then the fast tests only (-m "not slow": in-process, no
## subprocess, no HTTP server, no kill or restart); under a minute, for every edit
check: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -m "not slow"

## make demo: create .venv, install, then a guided tour in a throwaway sandbox (.demo/)
demo: $(STAMP)
	$(PY) scripts/demo.py

clean:
	rm -rf $(VENV) .demo .bench .pytest_cache

## make bench [N=5000] [SIZES=5000,50000] [NET=loopback|latency|ratelimit]
## [LATENCY_MS=25] [RATE=300]: time move.py against s5cmd, rclone, aws s3 cp and
## the first sketch on a throwaway SeaweedFS + PostgreSQL on 127.0.0.1, straight
## (loopback) or through bench/netproxy.py; prints a Markdown table and writes it
## into docs/benchmarks.md, in the section of that network model
.PHONY: bench
N ?= 5000
SIZES ?=
NET ?= loopback
LATENCY_MS ?=
RATE ?=
BENCH_STAMP := $(VENV)/.installed-bench
AWSCLI_VENV := .venv-bench-awscli

bench: $(BENCH_STAMP) $(AWSCLI_VENV)/.installed
	$(PY) bench/run.py -n $(N) --table-scale $(if $(SIZES),--sizes $(SIZES)) --aws $(AWSCLI_VENV)/bin/aws \
		--network $(NET) $(if $(LATENCY_MS),--latency-ms $(LATENCY_MS)) $(if $(RATE),--rate $(RATE))

$(BENCH_STAMP): $(STAMP) bench/requirements.txt
	$(PY) -m pip install -q -r bench/requirements.txt
	touch $@

$(AWSCLI_VENV)/.installed: bench/requirements-awscli.txt
	$(PYTHON) -m venv $(AWSCLI_VENV)
	$(AWSCLI_VENV)/bin/python -m pip install -q --upgrade pip
	$(AWSCLI_VENV)/bin/python -m pip install -q -r bench/requirements-awscli.txt
	touch $@
