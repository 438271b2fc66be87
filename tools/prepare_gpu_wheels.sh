#!/usr/bin/env bash
# Download, on a machine with package-registry access, the wheels the GPU machine lacks, into .whl/
# (git-ignored); tools/gpu_report.py installs them there offline (pip install --no-index --no-deps).
#
#   bash tools/prepare_gpu_wheels.sh          # then carry .whl/ to the GPU machine with the checkout
#
# The GPU machine (/work/.library/device/KINDS.md): Python 3.12, torch 2.11 (CUDA 13), triton 3.6, and
# already numpy, packaging, psutil, tokenizers, safetensors, transformers, tensorboard, tqdm, pytest and
# pytest-xdist, i.e. everything setup.py asks for except megatron-core. megatron-core 0.19.2 (tested with
# torch 2.11, docs/MEGATRON.md) needs only torch, numpy and packaging>=24.2 (no extras are used), so one
# wheel travels. No internet there, so nothing is resolved there: --no-deps here, one version per name.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WHEELS=("megatron-core==0.19.2")
rm -rf .whl && mkdir -p .whl
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d .whl "${WHEELS[@]}"
ls -l .whl
echo "total: $(du -sk .whl | cut -f1) KiB in .whl/ (the device tool carries at most 64 MiB with the checkout)"
