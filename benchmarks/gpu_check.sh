#!/bin/bash
# The GPU checks of the probe (issue 15, item 9), as run on an NVIDIA H200 on 2026-11-26 (README,
# Benchmarks): the CUDA runs of the probe tests, the deep-model tests on CPU and CUDA, and the
# overhead benchmark with the GPU-sized models.  Run from the repository root on a machine with a GPU
# and torch built for CUDA:
#
#     bash benchmarks/gpu_check.sh [OUT]        # logs into OUT (default /tmp/gpu_check)
#
# On a machine without network access, carry the missing wheels (python 3.12 there):
#     pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
#         --platform manylinux2014_x86_64 -d .whl netCDF4 cftime mnist1d dask distributed partd locket tblib \
#         tornado zict backpack-for-pytorch unfoldNd
# and install them there first: pip install --no-index --no-deps --target /tmp/site .whl/*.whl and
# export PYTHONPATH=/tmp/site:$PWD.
OUT=${1:-${OUT:-/tmp/gpu_check}}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))" \
    | tee "$OUT/env.txt"
timeout 300 python3 -m pytest -q -p no:cacheprovider -rfE tests/test_deepmodels.py tests/test_fastpath_layers.py \
    tests/test_gns.py tests/test_validation_deepmodels.py -k cuda > "$OUT/cuda_tests.txt" 2>&1
tail -3 "$OUT/cuda_tests.txt"
timeout 300 python3 benchmarks/probe_overhead.py --device cuda --repeat 30 \
    --models mlp,cnn28,transformer,mlp_big,transformer_big > "$OUT/bench.txt" 2>&1
grep -v "^ *ours:\|(transformer on" "$OUT/bench.txt"
