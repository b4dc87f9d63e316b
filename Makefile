# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
#   PYTHON=.venv/bin/python   the interpreter (and so the environment) every target installs into and runs
#   TORCH_INDEX=https://download.pytorch.org/whl/cpu   also look there for torch/torchvision (a CPU build:
#                             about 0.7 GB instead of the CUDA build's 5.5 GB)
#   WHEELS=../shared/wheels   where a prebuilt mmcv wheel is looked for (make test)
#   BUILD_MMCV=1              make test builds mmcv from source when no wheel fits (about 46 minutes on 2 cores)
#   DEMO_ARGS="--checkpoint-hist 3"   more tools/train.py flags for make demo (it keeps only last and model_best)
PYTHON ?= python
TORCH_INDEX ?=
WHEELS ?= ../shared/wheels
BUILD_MMCV ?=
DEMO_ARGS ?=
PIP = $(PYTHON) -m pip install -q -c constraints.txt $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))

.PHONY: install demo test

install:
	$(PIP) -e ".[dev]"

# Trains a small zoo model on the embedded default data (scikit-learn's digits) and prints validation accuracy.
demo: install
	$(PYTHON) tools/train.py --model groupmamba_tiny --epochs 2 $(DEMO_ARGS)

# Installs everything the tests need (mm extras included where mmcv can be had) and runs the suite, as CI does.
test:
	PYTHON="$(PYTHON)" TORCH_INDEX="$(TORCH_INDEX)" MMCV_WHEELS="$(WHEELS)" BUILD_MMCV="$(BUILD_MMCV)" bash .ci/run
