#!/usr/bin/env bash
# Fetch, here (with PyPI), the wheels the GPU machine may lack for the benchmark report: matplotlib (the
# plots), tqdm (progress bars), pytest-xdist + execnet (the GPU tests in parallel) and ninja (the CUDA
# extension in parallel), with matplotlib's pure dependencies, for CPython 3.12 on x86-64 Linux.
# They go to .whl/ (git-ignored); name .whl in the device tool's `carry` and bench/gpu_visit.sh installs
# them. Without them the report still has its Markdown table, and progress is printed line by line.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$p")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
    -d .whl matplotlib contourpy kiwisolver fonttools cycler pyparsing python-dateutil six tqdm \
    pytest-xdist execnet ninja
ls -la .whl
