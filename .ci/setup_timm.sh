#!/usr/bin/env bash
# timm for the parity and preprocessing tests, on a CPU machine whose torch is the CPU build on disk.
# timm's wheel requires torchvision, and no torchvision wheel on the package index loads with this torch
# (its C++ ops library is built for another torch), so a plain `pip install timm` would either fail or
# replace torch. Instead:
#   1. timm itself with --no-deps, plus its real dependencies (pyyaml, huggingface_hub, safetensors);
#   2. torchvision's pure-Python sources unpacked beside the environment (<sys.prefix>/torchvision-py),
#      never installed into it: tests/torchvision_standin.py imports torchvision's transforms and
#      ops.misc from there without running torchvision's package __init__ (which loads the C++ ops).
# Idempotent; run it with the project's environment active, after `pip install -e ".[test]"`.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -n "${VIRTUAL_ENV:-}" ]; then PY=$VIRTUAL_ENV/bin/python
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3
fi
export PIP_CONSTRAINT="${PIP_CONSTRAINT:-$PWD/.ci/constraints.txt}"   # never another torch
TIMM="timm==1.0.31"
TORCHVISION="torchvision==0.29.2"
TV_DIR="$("$PY" -c 'import sys; print(sys.prefix)')/torchvision-py"

"$PY" -m pip install --quiet "pyyaml>=5.1" "huggingface_hub>=0.23" "safetensors>=0.4"
"$PY" -m pip install --quiet --no-deps "$TIMM"
if [ -f "$TV_DIR/torchvision/transforms/functional.py" ]; then
    echo "setup_timm: torchvision sources already in $TV_DIR"
else
    "$PY" -m pip install --quiet --no-deps --no-compile --target "$TV_DIR" "$TORCHVISION"
    # the compiled parts are built for another torch and never used: remove them, keep the Python
    rm -rf "$TV_DIR/torchvision.libs"
    find "$TV_DIR" -name '*.so*' -delete
    echo "setup_timm: torchvision sources in $TV_DIR (not importable as a package: see tests/torchvision_standin.py)"
fi
