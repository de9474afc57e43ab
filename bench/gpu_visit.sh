#!/usr/bin/env bash
# One visit to a GPU machine without network, in one go (under 10 minutes on an H100):
#   install the project from this working tree, run the test suite on the GPU, run the benchmark at the
#   issue's key points (MobileViT-S, 256x256, float16: batch 1, 8, 64, 256 for the quick engines; batch 1
#   and 256 for torch.compile), the kernel microbenchmarks and a smoke run of `pytest bench/`, and leave
#   results.json, report.md, the plots and the logs in one folder: $OUT when set (the device tool), else
#   bench/results/<date>-<gpu>/.
#
#   bash bench/gpu_visit.sh                     # defaults
#   MAX_AUTOTUNE=1 bash bench/gpu_visit.sh      # add torch.compile(mode="max-autotune") at batch 1 and 256
#                                               # (compiles for minutes: drop other stages, see below)
#   STAGES="bench compile" bash bench/gpu_visit.sh
#   FASTMVIT_GIT_COMMIT=<sha> bash bench/gpu_visit.sh   # where the copy of the tree has no .git
#
# Each stage has a time limit, so the script always ends with a report of what it measured; a sweep cut
# short keeps the points it finished. Wheels in .whl/ (see bench/fetch_wheels.sh) are installed first,
# for packages the machine lacks (matplotlib, tqdm). At most 8 files are left in the folder.
set -uo pipefail
cd "$(dirname "$0")/.."

STAGES=${STAGES:-"install tests bench compile kernels pytest-bench"}
TESTS_TIMEOUT=${TESTS_TIMEOUT:-150}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-120}
COMPILE_TIMEOUT=${COMPILE_TIMEOUT:-210}
KERNELS_TIMEOUT=${KERNELS_TIMEOUT:-90}
PYTEST_BENCH_TIMEOUT=${PYTEST_BENCH_TIMEOUT:-60}
TOTAL=${TOTAL:-560}          # seconds the whole visit may take; later stages shrink to fit
MODEL=${MODEL:-s}
DTYPE=${DTYPE:-float16}
BATCHES=${BATCHES:-1,8,64,256}
COMPILE_BATCHES=${COMPILE_BATCHES:-1,256}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

has() { [[ " $STAGES " == *" $1 "* ]]; }
left() { echo $(( TOTAL - SECONDS )); }
limit() { local want=$1 l; l=$(left); (( l - 15 < want )) && want=$(( l - 15 )); (( want < 0 )) && want=0; echo "$want"; }
log() { echo "== [$SECONDS s] $*" | tee -a "$LOG"; }

if [[ -z "${OUT:-}" ]]; then
    gpu=$(python3 -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-'))" 2>/dev/null || echo cpu)
    OUT="bench/results/$(date -u +%Y%m%d-%H%M)-$gpu"
fi
mkdir -p "$OUT"
WORK=$(mktemp -d)
LOG="$OUT/visit.log"
: > "$LOG"

if has install; then
    log "install"
    if compgen -G ".whl/*.whl" > /dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .whl/*.whl >> "$LOG" 2>&1 && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
    python3 -m pip install --no-deps --no-build-isolation -e . >> "$LOG" 2>&1 || log "install FAILED (see above)"
    python3 -m fastmvit info 2>&1 | tee -a "$LOG"
    nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,power.limit --format=csv >> "$LOG" 2>&1 || true
fi

# stage NAME SECONDS LOGFILE CMD...: run CMD under a time limit that also fits the visit's TOTAL
stage() {
    local name=$1 want=$2 out=$3; shift 3
    local t; t=$(limit "$want")
    if (( t < 20 )); then log "$name: skipped, ${t}s left"; return 0; fi
    log "$name (limit ${t}s)"
    timeout "$t" "$@" >> "$out" 2>&1
    local rc=$?
    log "$name: exit $rc$([[ $rc == 124 ]] && echo ' (time limit: the points it finished are kept)')"
}

if has tests; then
    stage tests "$TESTS_TIMEOUT" "$OUT/tests.log" python3 -m pytest tests -q -p no:cacheprovider
    tail -3 "$OUT/tests.log" | tee -a "$LOG"
fi

results=()
if has bench; then
    stage "bench: quick engines at batch $BATCHES" "$BENCH_TIMEOUT" "$LOG" \
        python3 -m fastmvit bench --models "$MODEL" --dtypes "$DTYPE" --batches "$BATCHES" \
        --engines fastmvit,fastmvit-nograph,torch-eager,torch-autocast,torch-channels-last,timm-eager,hf-eager \
        --json "$WORK/quick.json"
    [[ -f "$WORK/quick.json" ]] && results+=("$WORK/quick.json")
fi

if has compile; then
    engines=fastmvit,torch-eager,torch-autocast,compile,compile-reduce-overhead
    [[ "${MAX_AUTOTUNE:-0}" == 1 ]] && engines="$engines,compile-max-autotune"
    stage "bench: torch.compile at batch $COMPILE_BATCHES" "$COMPILE_TIMEOUT" "$LOG" \
        python3 -m fastmvit bench --models "$MODEL" --dtypes "$DTYPE" --batches "$COMPILE_BATCHES" \
        --engines "$engines" --no-measure-peak --json "$WORK/compile.json"
    [[ -f "$WORK/compile.json" ]] && results+=("$WORK/compile.json")
fi

if has kernels; then
    stage "kernel microbenchmarks" "$KERNELS_TIMEOUT" "$LOG" \
        python3 -m fastmvit bench kernels --dtypes "$DTYPE" --json "$WORK/kernels.json"
    [[ -f "$WORK/kernels.json" ]] && results+=("$WORK/kernels.json")
fi

if has pytest-bench; then
    stage "pytest bench/ --benchmark-only (smoke selection)" "$PYTEST_BENCH_TIMEOUT" "$LOG" \
        python3 -m pytest bench --benchmark-only -q -p no:cacheprovider --bench-models "$MODEL" \
        --bench-batches 1 --bench-dtypes "$DTYPE" --bench-engines fastmvit,torch-eager --bench-kernel-batch 8 \
        --bench-json "$WORK/pytest-bench.json"
fi

if (( ${#results[@]} )); then
    log "report"
    python3 -m fastmvit bench report "${results[@]}" --out "$OUT" --save "$OUT/results.json" 2>&1 | tee -a "$LOG"
else
    log "no results to report"
fi
log "done: $(ls "$OUT" | tr '\n' ' ')"
