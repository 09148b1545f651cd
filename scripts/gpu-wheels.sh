#!/usr/bin/env bash
# Collect what scripts/gpu-check.sh installs on a GPU machine that has python 3.12 + torch and no
# network: pure wheels (--no-deps: each dependency named), and the sdists of mmcv (built there
# with CUDA), fvcore and antlr4 (pure python, sdist only). About 13 MB.
#   scripts/gpu-wheels.sh DIR
set -euo pipefail
dest=${1:?usage: gpu-wheels.sh DIR}
mkdir -p "$dest"
plat=(--python-version 3.12 --implementation cp --only-binary=:all:)
for p in 2_17 2_24 2_27 2_28 2_31 2_34; do plat+=(--platform "manylinux_${p}_x86_64"); done
plat+=(--platform manylinux2014_x86_64)
python3 -m pip download -q --no-deps "${plat[@]}" -d "$dest" \
    "setuptools==80.9.0" "pydantic==2.11.9" "pydantic-core==2.33.2" "annotated-types==0.7.0" \
    "typing-inspection==0.4.1" "pycocotools==2.0.10" "cellpose==3.1.1.2" "fastremap" "fill-voids" "natsort" \
    "roifile" "mmengine==0.10.7" "addict" "termcolor" "yapf" "platformdirs" "mmdet==3.3.0" "terminaltables" \
    "shapely" "yacs" "omegaconf==2.3.0" "hydra-core==1.3.8" "iopath==0.1.9"
# yolo-seg (opt-in: WITH_YOLO=1): Ultralytics and its polars need 54 MB more, 67 MB in all, over the
# 64 MiB a lent GPU machine's wheel folder may hold. StarDist's TensorFlow (~590 MB with CUDA) never fits:
# on a GPU machine with network, `make setup-stardist` builds its environment (tensorflow[and-cuda]).
if [[ "${WITH_YOLO:-0}" == 1 ]]; then
    python3 -m pip download -q --no-deps "${plat[@]}" -d "$dest" "ultralytics==8.4.190" "ultralytics-thop==2.2.3" \
        "polars==2.1.0" "polars-runtime-32==2.1.0" "ultralytics-platform==0.1.99" "nvidia-ml-py"
fi
# sdists straight from the index (pip download would try to build their metadata here)
python3 - "$dest" <<'PY'
import hashlib, re, sys, urllib.request
for name, fn in [("mmcv", "mmcv-2.1.0.tar.gz"), ("fvcore", "fvcore-0.1.5.post20221221.tar.gz"),
                 ("antlr4-python3-runtime", "antlr4-python3-runtime-4.9.3.tar.gz")]:
    html = urllib.request.urlopen(f"https://pypi.org/simple/{name}/").read().decode()
    url, sha = re.search(r'href="([^"]*/' + re.escape(fn) + r')#sha256=([0-9a-f]+)"', html).groups()
    data = urllib.request.urlopen(url.replace("&amp;", "&")).read()
    assert hashlib.sha256(data).hexdigest() == sha, f"{fn}: checksum mismatch"
    open(f"{sys.argv[1]}/{fn}", "wb").write(data)
PY
du -sh "$dest"
