# The two commands of the README:  make demo  (set up + offline CPU demo)   make test  (set up + tests)
VENV ?= .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: requirements.txt requirements-nodeps.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -r requirements-nodeps.txt
	touch $@

setup: $(VENV)/.installed

demo: setup
	PATH="$(abspath $(VENV))/bin:$$PATH" bash demo.sh

test: setup
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest -q tests

lint: setup
	$(VENV)/bin/ruff check .

.PHONY: setup demo test lint
