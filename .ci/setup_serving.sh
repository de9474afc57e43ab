#!/usr/bin/env bash
# Prepare what the serving tests (tests/serving) need on a fresh CPU machine. Idempotent: a second run
# checks and says "already", in a few seconds. Run it with the project's environment active, after
# `pip install -e ".[test,serve]"`:
#   1. the serving packages, if the environment lacks them (litserve, tritonclient[http,grpc],
#      prometheus-client, aiohttp);
#   2. the tritonserver binary that the nvidia-pytriton wheel bundles, unpacked beside the environment
#      (not pip-installed: the wheel pins numpy<2, which must stay out of the project's environment),
#      a Python backend for this Python, and the backend stub's own small venv (numpy<2, seeing the
#      project's packages); see fastmvit/serving/launch.py. The tests find it at
#      <sys.prefix>/fastmvit-tritonserver/install.json and skip, saying why, when it is not there.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -n "${VIRTUAL_ENV:-}" ]; then PY=$VIRTUAL_ENV/bin/python
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3
fi
export PIP_CONSTRAINT="${PIP_CONSTRAINT:-$PWD/.ci/constraints.txt}"   # never another torch
echo "setup_serving: using $PY ($("$PY" -c 'import sys; print(sys.prefix)'))"

if "$PY" -c "import litserve, tritonclient.http, tritonclient.grpc, prometheus_client, aiohttp" 2>/dev/null; then
    echo "setup_serving: serving packages already installed"
else
    echo "setup_serving: installing the serving packages"
    "$PY" -m pip install --quiet "litserve>=0.2.10" "tritonclient[http,grpc]>=2.40" "prometheus-client>=0.17" "aiohttp>=3.8"
fi

# run as a file: importing the fastmvit package (and torch) is not needed for this
"$PY" fastmvit/serving/launch.py install-tritonserver
