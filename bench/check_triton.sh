#!/usr/bin/env bash
# Run the ahead-of-time kernel check (python -m fastmvit.kernels check) under another Triton version.
#
#   bench/check_triton.sh VERSION [check options]     e.g. bench/check_triton.sh 3.6.0 --arch 80 --family gemm
#
# The side environment is a venv OUTSIDE the repository (default ~/.cache/fastmvit/triton-VERSION; set
# FASTMVIT_SIDE_ENV to move it) holding that triton only (pip install --no-deps: never another torch).
# A .pth file adds the project venv's site-packages (FASTMVIT_VENV, default this checkout's .venv) AFTER the
# venv's own, so the side triton wins and torch and the rest are borrowed. Made once, reused after.
# The check itself runs on this checkout's sources (PYTHONPATH), with the interpreter off.
set -euo pipefail
if [ $# -lt 1 ] || [[ "$1" == -* ]]; then
    echo "usage: $0 TRITON_VERSION [python -m fastmvit.kernels check options]" >&2
    exit 2
fi
version=$1
shift
repo=$(cd "$(dirname "$0")/.." && pwd)
project_venv=${FASTMVIT_VENV:-$repo/.venv}
side=${FASTMVIT_SIDE_ENV:-${XDG_CACHE_HOME:-$HOME/.cache}/fastmvit/triton-$version}
side=$(realpath -m "$side")
case "$side/" in
    "$repo"/*) echo "$0: the side environment must live outside the repository, not in $side" >&2; exit 2 ;;
esac
base_py=$project_venv/bin/python
[ -x "$base_py" ] || { echo "$0: no project venv at $project_venv (set FASTMVIT_VENV)" >&2; exit 2; }
borrowed=$("$base_py" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")

has_version() {
    [ -x "$side/bin/python" ] && "$side/bin/python" - "$version" <<'PY' 2>/dev/null
import sys, importlib.metadata as md
sys.exit(0 if md.version("triton") == sys.argv[1] else 1)
PY
}

if ! has_version; then
    echo "== making $side (triton $version, torch borrowed from $project_venv)" >&2
    "$base_py" -m venv "$side"
    own=$("$side/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    "$side/bin/python" -m pip install -q --no-deps "triton==$version"
    # addsitedir appends (after the venv's own site-packages) and reads that directory's .pth files too
    echo "import site; site.addsitedir('$borrowed')" > "$own/zz_fastmvit_borrow.pth"
fi
"$side/bin/python" - "$version" <<'PY'
import sys, triton, torch
assert triton.__version__ == sys.argv[1], f"triton {triton.__version__} imported, not {sys.argv[1]}"
print(f"== triton {triton.__version__} ({triton.__file__}), torch {torch.__version__}", file=sys.stderr)
PY
cd "$repo"
PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" TRITON_INTERPRET=0 exec "$side/bin/python" -m fastmvit.kernels check "$@"
