# cellbench: one command sets up, one runs the comparison, one runs the tests.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip
STAMP  := $(VENV)/.cellbench-setup
export MAX_JOBS ?= 2

.PHONY: setup setup-detectron2 test compare bench sweep-smoke clean-venv smoke

setup: $(STAMP)

# Order matters (see DEVELOPERS.md): torch with the triple '=' so the CUDA build wins
# over the local CPU-only wheel; mmcv is an sdist that imports torch and pkg_resources
# in setup.py, so it builds without isolation against the torch and setuptools here.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip "setuptools>=77,<81" wheel
	$(PIP) install -q "torch===2.13.0" "torchvision==0.28.0"
	$(PIP) install -q -e ".[dev]" "cellpose>=3.1,<4" "mmengine==0.10.7" "setuptools>=77,<81"
	$(PIP) install -q --no-build-isolation "mmcv==2.1.0"
	$(PIP) install -q "mmdet==3.3.0"
	$(BIN)/python -c "import torch, torchvision, cellpose, mmcv, mmdet, mmcv.ops; print('setup ok: torch', torch.__version__, 'mmcv', mmcv.__version__, 'mmdet', mmdet.__version__)"
	touch $(STAMP)

# Detectron2 has no registry package: build it from its source (a local checkout or a git URL).
setup-detectron2: $(STAMP)
	@test -n "$(D2_SRC)" || (echo "usage: make setup-detectron2 D2_SRC=<path to a detectron2 checkout or its git URL>"; exit 2)
	case "$(D2_SRC)" in *://*|git@*) $(PIP) install --no-build-isolation "git+$(D2_SRC)" ;; *) $(PIP) install --no-build-isolation -e "$(D2_SRC)" ;; esac

test: $(STAMP)
	$(BIN)/python -m pytest -q -ra tests

MODELS ?= maskrcnn,cascade,cellpose,maskrcnn-tv,watershed
# the report is written even when some models failed; the exit code is bench run's
compare: $(STAMP)
	@$(BIN)/bench run --models $(MODELS) --preset smoke; rc=$$?; \
	run=$$(ls -td results/runs/*/ | head -1); \
	$(BIN)/bench tune "$$run" && $(BIN)/bench report "$$run"; \
	exit $$rc

bench: $(STAMP)
	$(BIN)/python -m bench.benchmarks

# the study's experiments at CPU smoke scale (bench sweep; report in the sweep folder)
sweep-smoke: $(STAMP)
	$(BIN)/bench sweep configs/experiments/study-smoke.yaml

clean-venv:
	rm -rf $(VENV)
