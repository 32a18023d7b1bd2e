# Two commands for users: `make demo` and `make test`. Both build .venv first.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint docs bench venv clean

venv: $(STAMP)

$(STAMP): setup.cfg setup.py requirements/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=23"
	$(BIN)/python -m pip install --quiet -c requirements/constraints.txt -e ".[test,demo,docs]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/forecasting_demo.py

test: $(STAMP) lint docs
	$(BIN)/python -m pytest -q

# The site, strictly: any warning (a broken link or reference, a docstring numpydoc rejects) fails it.
# -E re-reads every page, so a warning is reported again on every build, not only the first.
docs: $(STAMP)
	$(BIN)/sphinx-build -E -W --keep-going -n -q -b html docs build/docs/html

lint: $(STAMP)
	$(BIN)/ruff check --no-cache .
	$(BIN)/ruff format --no-cache --check .

bench: $(STAMP)
	$(BIN)/python -m bench.run $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
