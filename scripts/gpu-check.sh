#!/usr/bin/env bash
# The GPU check: on a bare CUDA machine whose python already has torch and torchvision (and
# nvcc), install everything else from a folder of wheels/sdists (no network), build mmcv and
# Detectron2 with their CUDA ops, run the cuda tests (`make test-gpu`'s tests) and a smoke
# `bench run` of all five models on --device cuda, and write the figures (s/iter, ms/img,
# peak CUDA memory, Kaggle mAP) with the card's name.
#
#   scripts/gpu-check.sh [--phase build|check|all] WHEELS_DIR WORK_DIR [DETECTRON2_SRC]
#
# WHEELS_DIR: what `make gpu-wheels` collects (pure wheels, mmcv/fvcore/antlr4 sdists); built
#   CUDA wheels found in WHEELS_DIR/built/ are installed instead of building again.
# WORK_DIR: logs, built wheels (WORK_DIR/built), the run folder and gpu-figures.{json,md}.
# build: install + compile (+ verify CUDA ops); check: tests + bench run + figures; all: both.
# Environment: PYTHON (default python3), MAX_JOBS (default: all cores).
set -uo pipefail

phase=all
if [[ "${1:-}" == "--phase" ]]; then phase=$2; shift 2; fi
WHEELS=$(realpath "${1:?usage: gpu-check.sh [--phase P] WHEELS_DIR WORK_DIR [D2_SRC]}")
WORK=$(realpath -m "${2:?WORK_DIR missing}")
D2_SRC=${3:-}
PY=${PYTHON:-python3}
mkdir -p "$WORK/built"
cd "$(dirname "$0")/.."

log() { echo "[$(date +%T)] $*" | tee -a "$WORK/steps.log"; }
die() { log "FAILED: $*"; exit 1; }

arch=$($PY -c "import torch; assert torch.cuda.is_available(); print('%d.%d' % torch.cuda.get_device_capability())") \
    || die "torch sees no CUDA GPU"
command -v nvcc >/dev/null || die "nvcc is not on PATH (the CUDA ops need CUDA's compiler)"
export FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$arch" PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1
cores=${MAX_JOBS:-$(nproc)}
# Link the C++ runtime dynamically, by its soname. Without this, the first lent GPU machine linked
# pieces of libstdc++.a into mmcv's _ext.so (no libstdc++ among its NEEDED libraries; std::locale
# defined inside it), and the first std::ostringstream in it crashed the process (SIGSEGV in
# get_compiling_cuda_version). Two C++ runtimes in one process is the bug, whatever pulled the
# static one in; naming the shared one first leaves nothing for the archive to supply.
export LDFLAGS="${LDFLAGS:-} -Wl,--no-as-needed -l:libstdc++.so.6 -Wl,--as-needed"

install_pure() {
    log "installing wheels from $WHEELS"
    $PY -m pip install -q --no-deps "$WHEELS"/*.whl || die "wheel install"
    $PY -m pip install -q --no-deps --no-build-isolation "$WHEELS"/fvcore-*.tar.gz "$WHEELS"/antlr4-*.tar.gz \
        || die "fvcore/antlr4 install"
    $PY -m pip install -q --no-deps --no-build-isolation --ignore-requires-python -e . || die "cellbench install"
}

# a CUDA wheel built earlier (WHEELS/built or WORK/built) is installed; else it is built here
build_wheel() {  # name source jobs
    local name=$1 src=$2 jobs=$3 have
    have=$(ls "$WHEELS"/built/"$name"-*.whl "$WORK"/built/"$name"-*.whl 2>/dev/null | head -1)
    if [[ -z "$have" ]]; then
        log "building $name with CUDA ops for sm_$arch ($jobs jobs)"
        MAX_JOBS=$jobs $PY -m pip wheel -q --no-deps --no-build-isolation -w "$WORK/built" "$src" \
            > "$WORK/build-$name.log" 2>&1 || { tail -40 "$WORK/build-$name.log"; die "$name build"; }
        have=$(ls "$WORK"/built/"$name"-*.whl | head -1)
    fi
    $PY -m pip install -q --no-deps --force-reinstall "$have" || die "$name install"
    log "$name installed from $(basename "$have")"
    check_cxx_runtime "$have" || die "$name: its extension carries its own copy of libstdc++ (rebuild it)"
}

# an extension must take the C++ runtime from libstdc++.so.6, like torch, not carry its own copy
check_cxx_runtime() {  # wheel
    local tmp so ok=0
    tmp=$(mktemp -d)
    (cd "$tmp" && $PY -m zipfile -e "$1" . >/dev/null)
    for so in $(find "$tmp" -name '_ext*.so' -o -name '_C*.so'); do
        if readelf -d "$so" | grep -q 'NEEDED.*libstdc++'; then log "  $(basename "$so"): links libstdc++.so.6"
        else log "  $(basename "$so"): libstdc++ NOT among its needed libraries"; ok=1; fi
    done
    rm -rf "$tmp"
    return $ok
}

toolchain_report() {
    log "toolchain: $(g++ --version | head -1); nvcc $(nvcc --version | grep -o 'release [0-9.]*')"
    log "  g++ -print-file-name=libstdc++.so: $(g++ -print-file-name=libstdc++.so) ($(readlink -f "$(g++ -print-file-name=libstdc++.so)"))"
    log "  LDSHARED: $($PY -c 'import sysconfig; print(sysconfig.get_config_var("LDSHARED"))'); LDFLAGS:$LDFLAGS"
}

verify_cuda_ops() {
    $PY - <<'EOF' || die "CUDA ops"
import torch
from mmcv.ops import RoIAlign, get_compiling_cuda_version, nms
v = get_compiling_cuda_version()
assert v != "not available", "mmcv was built without CUDA ops"
x = torch.rand(1, 4, 16, 16, device="cuda")
rois = torch.tensor([[0, 1.0, 1.0, 9.0, 9.0]], device="cuda")
assert RoIAlign(4, 1.0, 2)(x, rois).is_cuda
boxes = torch.tensor([[0, 0, 4, 4], [0, 0, 4, 4.5]], device="cuda", dtype=torch.float32)
assert len(nms(boxes, torch.tensor([0.9, 0.8], device="cuda"), 0.5)[1]) == 1
print("mmcv CUDA ops: compiled with CUDA", v)
try:
    from detectron2 import _C
    from detectron2.layers import nms_rotated
    assert _C.has_cuda(), "detectron2 was built without CUDA ops"
    print("detectron2 CUDA ops:", _C.get_cuda_version())
    b = torch.tensor([[5, 5, 4, 4, 0], [5, 5, 4, 4.5, 0]], device="cuda", dtype=torch.float32)
    assert len(nms_rotated(b, torch.tensor([0.9, 0.8], device="cuda"), 0.5)) == 1
except ImportError as e:
    print("detectron2 not installed:", e)
EOF
}

if [[ $phase == build || $phase == all ]]; then
    toolchain_report
    install_pure
    build_wheel mmcv "$WHEELS/mmcv-2.1.0.tar.gz" $(( cores * 3 / 4 > 1 ? cores * 3 / 4 : 1 )) &
    p1=$!
    if [[ -n "$D2_SRC" ]]; then
        build_wheel detectron2 "$D2_SRC" $(( cores / 4 > 1 ? cores / 4 : 1 )) &
        p2=$!
        wait $p2 || log "detectron2 build failed (its rows will say not installed)"
    fi
    wait $p1 || die "mmcv"
    verify_cuda_ops | tee -a "$WORK/steps.log"
fi

if [[ $phase == check || $phase == all ]]; then
    $PY -c "import mmcv, cellpose, bench" 2>/dev/null || { install_pure; build_wheel mmcv "$WHEELS/mmcv-2.1.0.tar.gz" "$cores";
        [[ -n "$D2_SRC" ]] && build_wheel detectron2 "$D2_SRC" "$cores"; }
    log "imports, each in its own process (a crashing extension is named, with its Python stack)"
    [[ ${PROBE_IMPORTS:-1} == 0 ]] && log "  (skipped: PROBE_IMPORTS=0)"
    [[ ${PROBE_IMPORTS:-1} == 0 ]] || for m in cv2 torch.cuda mmcv mmcv.ops mmdet.models detectron2._C detectron2.modeling cellpose.models; do
        if $PY -X faulthandler -c "import $m" > "$WORK/import.log" 2>&1; then log "  import $m: ok"
        else log "  import $m: FAILED"; grep -v "^Extension modules" "$WORK/import.log" | head -25 | tee -a "$WORK/steps.log"; fi
    done
    log "cuda tests (pytest-xdist where present, so that a crashing test does not stop the others)"
    xdist=$($PY -c "import xdist" 2>/dev/null && echo "-n 4")
    $PY -m pytest -q -ra -m cuda $xdist tests/test_gpu.py > "$WORK/pytest-gpu.log" 2>&1
    log "cuda tests: $(tail -1 "$WORK/pytest-gpu.log")"
    log "bench run, all five models, smoke preset, --device cuda"
    rm -rf "$WORK/run"
    PYTHONUNBUFFERED=1 $PY -m bench run --models maskrcnn,cascade,cellpose,maskrcnn-tv,watershed --preset smoke \
        --device cuda --timeout ${MODEL_TIMEOUT:-150} --out "$WORK/run" > "$WORK/bench-run.log" 2>&1
    log "bench run exit $?"
    $PY -m bench.gpu_figures "$WORK/run" --out "$WORK/gpu-figures" | tee -a "$WORK/steps.log"
    if [[ ${OVERHEAD:-0} != 0 ]]; then
        log "harness overhead on cuda (python -m bench.overhead, limit ${OVERHEAD_TIMEOUT:-240} s)"
        timeout "${OVERHEAD_TIMEOUT:-240}" $PY -m bench.overhead --device cuda --threads 0 --reps "${OVERHEAD_REPS:-3}" \
            --out "$WORK/overhead-cuda.json" > "$WORK/overhead-cuda.log" 2>&1
        log "overhead exit $?"; tail -15 "$WORK/overhead-cuda.log" | tee -a "$WORK/steps.log"
    fi
fi
log "done"
