# cellbench: one command sets up, one runs the comparison, one runs the tests.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip
STAMP  := $(VENV)/.cellbench-setup
# StarDist's own environment (bench/envs.py: TensorFlow 2.15 needs numpy<2 and protobuf<5)
SD_VENV  ?= .venv-stardist
SD_STAMP := $(SD_VENV)/.cellbench-setup
TF_PKG   ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo 'tensorflow[and-cuda]==2.15.1' || echo 'tensorflow-cpu==2.15.1')
export MAX_JOBS ?= 2

.PHONY: setup setup-stardist setup-detectron2 test test-gpu gpu-wheels gpu-check compare compare-real bench sweep-smoke clean-venv smoke

# everything a full `make compare` needs: the main .venv and StarDist's own environment
setup: $(STAMP) $(SD_STAMP)

# With nvcc on PATH and a GPU that torch sees, mmcv and Detectron2 are built with their CUDA ops
# for that GPU's architecture (never from pip's cache of a CPU-only build), and setup fails loudly
# when the ops still say CUDA is not available. The C++ runtime is linked as the shared
# libstdc++.so.6: a CUDA build that pulled in libstdc++.a crashed at its first std::ostringstream
# (DEVELOPERS.md, "GPU machines").
# (a shell prefix, evaluated when the line runs: torch is installed by then)
CUDA_BUILD = arch=$$($(BIN)/python -c "import torch; c = torch.cuda.get_device_capability() if torch.cuda.is_available() else None; print('%d.%d' % c if c else '')" 2>/dev/null); \
	if [ -n "$$arch" ] && command -v nvcc >/dev/null 2>&1; then export FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=$$arch PIP_NO_CACHE_DIR=1 LDFLAGS="$$LDFLAGS -Wl,--no-as-needed -l:libstdc++.so.6 -Wl,--as-needed"; echo "building CUDA ops for sm_$$arch"; fi;
CHECK_MMCV_CUDA = $(BIN)/python -c "import torch, mmcv.ops as o; v = o.get_compiling_cuda_version(); assert not torch.cuda.is_available() or v != 'not available', 'mmcv has no CUDA ops on this GPU machine: make clean-venv setup'; print('mmcv ops: CUDA', v)"

# Order matters (see DEVELOPERS.md): torch with the triple '=' so the CUDA build wins
# over the local CPU-only wheel; mmcv is an sdist that imports torch and pkg_resources
# in setup.py, so it builds without isolation against the torch and setuptools here.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip "setuptools>=77,<81" wheel
	$(PIP) install -q "torch===2.13.0" "torchvision==0.28.0"
	$(PIP) install -q -e ".[dev,yolo]" "cellpose>=3.1,<4" "mmengine==0.10.7" "setuptools>=77,<81"
	$(CUDA_BUILD) $(PIP) install -q --no-build-isolation "mmcv==2.1.0"
	$(PIP) install -q "mmdet==3.3.0"
	$(BIN)/python -c "import torch, torchvision, cellpose, mmcv, mmdet, mmcv.ops; print('setup ok: torch', torch.__version__, 'mmcv', mmcv.__version__, 'mmdet', mmdet.__version__)"
	$(CHECK_MMCV_CUDA)
	touch $(STAMP)

# StarDist 0.9 on TensorFlow 2.15 (the last with Keras 2 built in) in its own venv, with cellbench's own
# (light) dependencies so that its worker runs there; the runner starts stardist's worker with it.
setup-stardist: $(SD_STAMP)
$(SD_STAMP): pyproject.toml Makefile
	test -x $(SD_VENV)/bin/python || $(PYTHON) -m venv $(SD_VENV)
	$(SD_VENV)/bin/python -m pip install -q --upgrade pip "setuptools>=77,<81" wheel
	$(SD_VENV)/bin/python -m pip install -q -e ".[dev]" "$(TF_PKG)" "stardist>=0.9,<0.10"
	$(SD_VENV)/bin/python -c "import numpy, tensorflow as tf, stardist; print('setup-stardist ok: tensorflow', tf.__version__, 'stardist', stardist.__version__, 'numpy', numpy.__version__)"
	touch $(SD_STAMP)

# Detectron2 has no registry package: build it from its source (a local checkout or a git URL).
setup-detectron2: $(STAMP)
	@test -n "$(D2_SRC)" || (echo "usage: make setup-detectron2 D2_SRC=<path to a detectron2 checkout or its git URL>"; exit 2)
	$(CUDA_BUILD) case "$(D2_SRC)" in *://*|git@*) $(PIP) install --no-build-isolation "git+$(D2_SRC)" ;; *) $(PIP) install --no-build-isolation -e "$(D2_SRC)" ;; esac
	$(BIN)/python -c "import torch; from detectron2 import _C; v = _C.has_cuda(); assert not torch.cuda.is_available() or v, 'detectron2 has no CUDA ops on this GPU machine: rebuild with nvcc on PATH'; print('detectron2 ops: CUDA' if v else 'detectron2 ops: CPU build')"

test: setup
	$(BIN)/python -m pytest -q -ra tests

# the cuda-marked tests: two AMP iterations + predict per adapter, compiled ops on the GPU
# (each skips cleanly where there is no GPU or its framework)
test-gpu: $(STAMP)
	$(BIN)/python -m pytest -q -ra -m cuda tests

# The GPU check on a bare CUDA machine (scripts/gpu-check.sh): `make gpu-wheels` here collects
# what it installs there (no network there), GPU_D2_SRC is a detectron2 checkout to build.
GPU_WHEELS ?= .whl
GPU_WORK ?= gpu-check
gpu-wheels:
	scripts/gpu-wheels.sh $(GPU_WHEELS)
gpu-check:
	scripts/gpu-check.sh $(GPU_WHEELS) $(GPU_WORK) $(GPU_D2_SRC)

MODELS ?= maskrcnn,cascade,cellpose,maskrcnn-tv,stardist,yolo-seg,watershed
# the report is written even when some models failed; the exit code is bench run's
compare: setup
	@$(BIN)/bench run --models $(MODELS) --preset smoke; rc=$$?; \
	run=$$(ls -td results/runs/*/ | head -1); \
	$(BIN)/bench tune "$$run" && $(BIN)/bench report "$$run"; \
	exit $$rc

# The real-data comparison (cpu presets, 2 cores): every dataset of DATA (default: both shared ones)
# -> results/real/<dataset>/ (leaderboard, plots, breakdown by the attribute the split is stratified
# by: DSB2018's modality). REAL_OPTS: more `bench run` options (e.g. --set iterations=100).
REAL_DATA ?= ../shared/data/dsb2018/annotations.json ../shared/data/usiigaci_phase
compare-real: $(STAMP)
	@rc=0; for d in $(or $(DATA),$(REAL_DATA)); do \
	  name=$$(basename $$d .json); [ "$$name" = annotations ] && name=$$(basename $$(dirname $$d)); \
	  case $$name in usiigaci*) extra="--opt yolo-seg.epochs=20";; *) extra="";; esac; \
	  run=results/runs/real-$$name-$$(date +%Y%m%d-%H%M%S); \
	  $(BIN)/bench run --models $(MODELS) --data $$d --preset cpu --out $$run $$extra $(REAL_OPTS) || rc=$$?; \
	  $(BIN)/bench tune $$run && $(BIN)/bench report $$run --out results/real/$$name --breakdown auto || rc=$$?; \
	done; exit $$rc

bench: $(STAMP)
	$(BIN)/python -m bench.benchmarks

# the study's experiments at CPU smoke scale (bench sweep; report in the sweep folder)
sweep-smoke: $(STAMP)
	$(BIN)/bench sweep configs/experiments/study-smoke.yaml

clean-venv:
	rm -rf $(VENV) $(SD_VENV)
