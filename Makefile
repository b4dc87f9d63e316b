# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python
PIP = $(PYTHON) -m pip install -q -c constraints.txt
WHEELS ?= ../shared/wheels

.PHONY: install demo test

install:
	$(PIP) -e ".[dev]"

# Trains a small zoo model on the embedded default data (scikit-learn's digits) and prints validation accuracy.
demo: install
	$(PYTHON) tools/train.py --model groupmamba_tiny --epochs 2

# Installs everything the tests need (mm extras included) and runs the suite, exactly as CI does.
test:
	bash .ci/run
