#!/usr/bin/env bash
# One visit to a GPU machine without network, in one `run` call (at most 10 minutes a command; the visit's
# 15 minutes of device time include the machine's start). Stages, in order of value, each under a time
# limit that also fits the whole visit (TOTAL seconds), so a slow or failing stage never costs the
# results of the others:
#
#   install  the project from this working tree (no CUDA extension yet: it builds in the background,
#            log in csrc-build.log, while the next stages run)
#   warmup   `python -m fastmvit warmup`: every kernel the benchmark launches (MODEL, DTYPE, BATCHES),
#            compiled in parallel over all cores into Triton's cache; its JSON has the wall time
#   tests    the GPU selection (kernels compiled for the GPU, the engine, CUDA graphs, csrc, warm-up),
#            not the CPU-only suites; in parallel with pytest-xdist when its wheel came along (-n 8)
#   bench    MODEL DTYPE at BATCHES: fastmvit (graphs and not) against eager, autocast, channels-last
#   compile  torch.compile (default and reduce-overhead) at COMPILE_BATCHES
#   plan     `python -m fastmvit info --plan` (the launch plan's predictions, when that command exists)
#   kernels  the kernel microbenchmarks (their JSON beside the plan)
#   split    MODEL DTYPE at batch 1 with the batch-1 splits off (FASTMVIT_SPLIT=1, nosplit.json): against
#            the bench stage's batch 1, the split rule's choice measured (the plan has its estimates)
#   report   results.json, report.md and the plots from whatever the bench stages finished
#
#   bash bench/gpu_visit.sh                               # all of it, within TOTAL=570 s
#   STAGES="install warmup tests" bash bench/gpu_visit.sh # a subset
#   MAX_AUTOTUNE=1 ...                                    # adds torch.compile(mode="max-autotune")
#   FASTMVIT_GIT_COMMIT=<sha> ...                         # where the copy of the tree has no .git
#
# Everything goes to one folder: $OUT when set (the device tool), else bench/results/<date>-<gpu>/:
# visit.log (every stage's start, limit, exit status and time), stages.tsv (the same as a table, printed
# last), a log per stage, and the results. Wheels in .whl/ (bench/fetch_wheels.sh: matplotlib, tqdm,
# pytest-xdist, ninja) are installed first for what the machine lacks; name .whl in the tool's `carry`.
set -uo pipefail
cd "$(dirname "$0")/.."

STAGES=${STAGES:-"install warmup tests bench compile plan kernels split report"}
WARMUP_TIMEOUT=${WARMUP_TIMEOUT:-90}
TESTS_TIMEOUT=${TESTS_TIMEOUT:-200}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-100}
COMPILE_TIMEOUT=${COMPILE_TIMEOUT:-150}
PLAN_TIMEOUT=${PLAN_TIMEOUT:-30}
KERNELS_TIMEOUT=${KERNELS_TIMEOUT:-60}
SPLIT_TIMEOUT=${SPLIT_TIMEOUT:-40}
TOTAL=${TOTAL:-570}          # seconds the whole visit may take; later stages shrink to fit
MODEL=${MODEL:-s}
DTYPE=${DTYPE:-float16}
BATCHES=${BATCHES:-1,8,64,256}
COMPILE_BATCHES=${COMPILE_BATCHES:-1,256}
TEST_WORKERS=${TEST_WORKERS:-8}
TEST_SELECTION=${TEST_SELECTION:-"tests/test_graphs.py tests/test_warmup.py tests/test_engine_cache.py tests/test_engine.py tests/test_csrc.py tests/kernels"}
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
printf "stage\tlimit_s\texit\tseconds\n" > "$OUT/stages.tsv"

# stage NAME SECONDS LOGFILE CMD...: run CMD under a time limit that also fits the visit's TOTAL; its exit
# status and time go to stages.tsv whatever happens (124: the time limit; what it finished is kept)
stage() {
    local name=$1 want=$2 out=$3; shift 3
    local t start rc; t=$(limit "$want")
    if (( t < 20 )); then log "$name: skipped, ${t}s left"; printf "%s\t%s\tskipped\t0\n" "$name" "$t" >> "$OUT/stages.tsv"; return 0; fi
    log "$name (limit ${t}s)"
    start=$SECONDS
    timeout -k 10 "$t" "$@" >> "$out" 2>&1
    rc=$?
    log "$name: exit $rc after $(( SECONDS - start )) s$([[ $rc == 124 ]] && echo ' (time limit: what it finished is kept)')"
    printf "%s\t%s\t%s\t%s\n" "$name" "$t" "$rc" "$(( SECONDS - start ))" >> "$OUT/stages.tsv"
    return 0
}

{
    echo "date: $(date -u +%FT%TZ)  commit: ${FASTMVIT_GIT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
    echo "cores: $(nproc)  python: $(python3 --version 2>&1)"
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" 2>&1
    nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,power.limit,memory.total --format=csv 2>&1
} >> "$LOG"

if has install; then
    log "install"
    if compgen -G ".whl/*.whl" > /dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .whl/*.whl >> "$LOG" 2>&1 && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} PATH=/tmp/site/bin:$PATH
    fi
    FASTMVIT_NO_EXTENSION=1 python3 -m pip install -q --no-deps --no-build-isolation -e . >> "$LOG" 2>&1 \
        || log "install FAILED (see above)"
    # The CUDA extension builds in the background on two or three of the cores (the warm-up takes the rest);
    # the csrc tests find it if it is done by then, and skip otherwise.
    if [[ -z "${CUDA_HOME:-}" ]]; then
        for d in /usr/local/cuda /usr/local/cuda-*; do [[ -f "$d/include/cuda_runtime.h" ]] && export CUDA_HOME=$d && break; done
    fi
    ( MAX_JOBS=3 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} timeout 240 python3 setup.py build_ext --inplace \
        > "$OUT/csrc-build.log" 2>&1; echo "exit $?" >> "$OUT/csrc-build.log" ) &
    CSRC_PID=$!
    python3 -m fastmvit info >> "$LOG" 2>&1
fi

if has warmup; then
    stage "warmup: $MODEL $DTYPE batch $BATCHES" "$WARMUP_TIMEOUT" "$LOG" \
        python3 -m fastmvit warmup --model "$MODEL" --dtype "$DTYPE" --batch "$BATCHES" --json "$OUT/warmup.json"
fi

if has tests; then
    xdist=()
    python3 -c "import xdist" 2>/dev/null && xdist=(-n "$TEST_WORKERS")
    # shellcheck disable=SC2086
    stage "tests (${xdist[*]:-serial})" "$TESTS_TIMEOUT" "$OUT/tests.log" \
        python3 -m pytest $TEST_SELECTION -v --tb=short -rfE -p no:cacheprovider --durations=20 "${xdist[@]}"
    # -v: each result is logged as it happens, so a run cut by its time limit still names what passed
    grep -cE "PASSED" "$OUT/tests.log" | sed "s/^/passed so far: /" | tee -a "$LOG"
    grep -E "FAILED|ERROR|[0-9]+ (passed|failed)" "$OUT/tests.log" | tail -30 | tee -a "$LOG"
fi

results=()
if has bench; then
    stage "bench: $MODEL $DTYPE at batch $BATCHES" "$BENCH_TIMEOUT" "$LOG" \
        python3 -m fastmvit bench --models "$MODEL" --dtypes "$DTYPE" --batches "$BATCHES" \
        --engines fastmvit,fastmvit-nograph,torch-eager,torch-autocast,torch-channels-last \
        --json "$WORK/quick.json"
    [[ -f "$WORK/quick.json" ]] && results+=("$WORK/quick.json")
fi

if has compile; then
    engines=fastmvit,torch-eager,compile,compile-reduce-overhead
    [[ "${MAX_AUTOTUNE:-0}" == 1 ]] && engines="$engines,compile-max-autotune"
    stage "bench: torch.compile at batch $COMPILE_BATCHES" "$COMPILE_TIMEOUT" "$LOG" \
        python3 -m fastmvit bench --models "$MODEL" --dtypes "$DTYPE" --batches "$COMPILE_BATCHES" \
        --engines "$engines" --no-measure-peak --json "$WORK/compile.json"
    [[ -f "$WORK/compile.json" ]] && results+=("$WORK/compile.json")
fi

if has plan; then
    if python3 -m fastmvit info --help 2>/dev/null | grep -q -- "--plan"; then
        for b in 1 256; do
            stage "plan: $MODEL batch $b" "$PLAN_TIMEOUT" "$OUT/plan.txt" \
                python3 -m fastmvit info --plan "$MODEL" --batch "$b"
        done
    else
        log "plan: this tree has no 'info --plan'"
    fi
fi

if has kernels; then
    stage "kernel microbenchmarks" "$KERNELS_TIMEOUT" "$LOG" \
        python3 -m fastmvit bench kernels --dtypes "$DTYPE" --json "$OUT/kernels.json"
fi

if has split; then  # not in the report: the same engine names as the bench stage's, another setting
    stage "bench: $MODEL $DTYPE batch 1 without splits" "$SPLIT_TIMEOUT" "$LOG" \
        env FASTMVIT_SPLIT=1 python3 -m fastmvit bench --models "$MODEL" --dtypes "$DTYPE" --batches 1 \
        --engines fastmvit,fastmvit-nograph --json "$OUT/nosplit.json"
fi

if [[ -n "${CSRC_PID:-}" ]]; then
    wait "$CSRC_PID" 2>/dev/null
    log "csrc build: $(tail -1 "$OUT/csrc-build.log")"
fi

if has report; then
    if (( ${#results[@]} )); then
        log "report"
        timeout 60 python3 -m fastmvit bench report "${results[@]}" --out "$OUT" --save "$OUT/results.json" 2>&1 | tee -a "$LOG"
    else
        log "report: no results"
    fi
fi
log "done: $(ls "$OUT" | tr '\n' ' ')"
column -t -s $'\t' "$OUT/stages.tsv" 2>/dev/null || cat "$OUT/stages.tsv"
