# Two entry points for a newcomer on a fresh machine:
#   make quickstart   set up .venv and train the quickstart GPT (no download of data)
#   make test         set up .venv and run the whole test suite (what CI runs)
#   make check        the fast loop: the suite without tests marked slow (TESTS= narrows it)

VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch; an unpinned `torch` would pull a multi-GB CUDA build.
TORCH ?= torch==2.13.0

.PHONY: setup quickstart test check clean

TESTS ?= tests contrib

$(VENV)/.installed: pyproject.toml setup.py contrib/mega-csv-logger/pyproject.toml contrib/mega-infonce/pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q -e ./contrib/mega-csv-logger -e ./contrib/mega-infonce
	touch $@

setup: $(VENV)/.installed

quickstart: $(VENV)/.installed
	$(VENV)/bin/mega run examples/quickstart.toml

test: $(VENV)/.installed
	$(PY) -m pytest tests contrib --durations=25

check: $(VENV)/.installed
	$(PY) -m pytest $(TESTS) -m "not slow" -q --durations=10

clean:
	rm -rf $(VENV) results build *.egg-info
