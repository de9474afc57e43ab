"""``python -m fastmvit.kernels check``: compile every kernel specialisation for sm_90/sm_80 (see check.py)."""
import sys

from .check import main

if __name__ == "__main__":
    argv = sys.argv[1:]
    if argv[:1] == ["check"]:
        argv = argv[1:]
    sys.exit(main(argv))
