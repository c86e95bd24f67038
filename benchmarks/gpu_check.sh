#!/usr/bin/env bash
# The one prepared GPU check, for one GPU with no network, bounded to 8 minutes (7:40 of sections):
#
#     bash benchmarks/gpu_bundle.sh              # here first: fills .whl/ (wheels, sdists, data)
#     OUT=/some/dir bash benchmarks/gpu_check.sh  # on the GPU machine, .whl/ carried with the checkout
#     bash benchmarks/gpu_check.sh --smoke        # CPU, tiny shapes, Triton interpreter (a test runs it)
#
# Sections, each under its own timeout so one hang cannot eat the rest:
#   setup    .whl/*.whl installed into a scratch site folder; megaxatl importable from this checkout
#   build    causal-conv1d's and mamba-ssm's CUDA extensions compiled from .whl/sdist for this GPU,
#            in the background from the start (benchmarks/gpu_build_ext.py), each with a deadline
#   triton   our Triton kernels vs naive (fp32 + bf16, forward + every gradient), scan bandwidth
#            vs a measured device copy (benchmarks/gpu_check.py --group triton)
#   train    20 bf16 steps of configs/mamba_1.4b_hybrid.json through the trainer: MFU and peak
#            memory beside `megaxatl plan`'s estimate (benchmarks/gpu_train_1b.py)
#   cuda     after the builds: mamba-ssm / causal-conv1d / flash-linear-attention vs naive, the
#            causal-conv1d channel-last TP stride cases, mamba_inner_fn vs our composed path, the
#            CUDA scan's bandwidth (benchmarks/gpu_check.py --group cuda)
# A library that did not build or load is NOT CHECKED (with the reason), never PASS.
#
# Output in $OUT (a temporary folder when unset): gpu_check.log (everything printed), results.jsonl
# (one row per case), summary.txt (the final table), setup.log, build-causal-conv1d.log,
# build-mamba-ssm.log, train-metrics.jsonl (the trainer's own metrics). Exit 0 when no row FAILs.
set -uo pipefail
cd "$(dirname "$0")/.."
SMOKE=0
[ "${1:-}" = "--smoke" ] && SMOKE=1
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
RES="$OUT/results.jsonl"
: > "$RES"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
TEE_PID=$!
T0=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET:-460}  # seconds for everything; sections shrink to what is left
SCRATCH=$(mktemp -d)
SITE="$SCRATCH/site"
mkdir -p "$SITE"
trap 'rm -rf "$SCRATCH"' EXIT

row() {  # section case status note
    "$PY" -c 'import json, sys; print(json.dumps(dict(zip(("section", "case", "status", "note"), sys.argv[1:]))))' \
        "$@" >> "$RES"
}
left() { echo $((BUDGET - ($(date +%s) - T0))); }
section() {  # name timeout command...: runs it under min(timeout, time left - 10 s)
    local name=$1 limit=$2; shift 2
    local avail=$(($(left) - 10))
    [ "$avail" -lt "$limit" ] && limit=$avail
    if [ "$limit" -lt 15 ]; then
        row "$name" "(section)" "NOT CHECKED" "no time left in the ${BUDGET} s budget"; return
    fi
    echo "=== $name (timeout ${limit} s, $(($(date +%s) - T0)) s elapsed) ==="
    timeout --kill-after=5 "$limit" "$@"
    local rc=$?
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        row "$name" "(section)" "FAIL" "timed out after ${limit} s: cases after the last reported one did not run"
    fi
    echo "=== $name done (rc $rc, $(($(date +%s) - T0)) s elapsed) ==="
}

echo "gpu_check: $(date -u +%FT%TZ) smoke=$SMOKE python=$("$PY" -c 'import sys; print(sys.version.split()[0])') out=$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"

# ---- setup: wheels, and megaxatl from this checkout (megaxatl/ + kernels/src as megaxatl.kernels,
# by links, as pyproject's package-dir maps them; nothing of the checkout is copied or changed)
{
    if [ $SMOKE -eq 0 ] && ls .whl/*.whl > /dev/null 2>&1; then
        pipi() { timeout 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
                     --target "$SITE" "$@"; }
        if pipi .whl/*.whl; then
            echo "installed: $(ls .whl/*.whl | xargs -n1 basename | tr '\n' ' ')"
        else  # one bad wheel must not keep the others out: one at a time
            for w in .whl/*.whl; do pipi "$w" && echo "installed $(basename "$w")" || echo "NOT installed $(basename "$w")"; done
        fi
    else
        echo "no wheels installed (smoke run, or no .whl/: run benchmarks/gpu_bundle.sh first)"
    fi
    mkdir -p "$SCRATCH/pkg/megaxatl"
    for entry in "$PWD"/megaxatl/*; do ln -s "$entry" "$SCRATCH/pkg/megaxatl/"; done
    ln -s "$PWD/kernels/src" "$SCRATCH/pkg/megaxatl/kernels"
} > "$OUT/setup.log" 2>&1
export PYTHONPATH="$SCRATCH/pkg:$SITE${PYTHONPATH:+:$PYTHONPATH}"
cat "$OUT/setup.log"
"$PY" - <<'EOF' || row setup "import megaxatl.kernels" FAIL "see setup.log / gpu_check.log"
import importlib
import megaxatl.kernels as k
print("megaxatl.kernels from", k.__file__)
for name in ("torch", "triton", "deepspeed", "fla", "transformers"):
    try:
        m = importlib.import_module(name)
        print(f"  {name} {getattr(m, '__version__', '?')}")
    except Exception as e:
        print(f"  {name}: does not import: {type(e).__name__}: {str(e)[:120]}")
EOF

# ---- builds, in the background from the start (nice: the checks' Python threads come first)
build_pids=()
declare -A build_limit
for spec in "causal-conv1d:causal_conv1d-*.tar.gz:6:240" "mamba-ssm:mamba_ssm-*.tar.gz:12:300"; do
    IFS=: read -r lib pattern jobs limit <<< "$spec"
    sdist=$(ls .whl/sdist/$pattern 2>/dev/null | head -1)
    build_limit[$lib]=$limit
    if [ $SMOKE -eq 1 ] || [ -z "$sdist" ]; then
        echo "$lib: not built ($([ $SMOKE -eq 1 ] && echo smoke run || echo no sdist in .whl/sdist))" > "$OUT/build-$lib.log"
        echo 3 > "$SCRATCH/build-$lib.rc"
        continue
    fi
    ( MAX_JOBS=$jobs timeout --kill-after=5 "$limit" nice -n 10 "$PY" benchmarks/gpu_build_ext.py "$lib" "$sdist" \
        --target "$SITE" > "$OUT/build-$lib.log" 2>&1; echo $? > "$SCRATCH/build-$lib.rc" ) &
    build_pids+=($!)
done

# ---- our Triton kernels, then training, while the builds run
if [ $SMOKE -eq 1 ]; then
    section triton 120 env TRITON_INTERPRET=1 "$PY" benchmarks/gpu_check.py --group triton --smoke --results "$RES"
else
    section triton 120 "$PY" benchmarks/gpu_check.py --group triton --results "$RES"
fi

DATA=.whl/data
if [ $SMOKE -eq 1 ] || [ ! -f "$DATA/manifest.json" ]; then  # smoke, or no bundle: the README as data
    mkdir -p "$SCRATCH/text"
    LC_ALL=C tr -cd '\11\12\40-\176' < README.md > "$SCRATCH/text/readme.txt"
    seq=$([ $SMOKE -eq 1 ] && echo 64 || echo 2048)
    "$PY" -m megaxatl prepare-data "$SCRATCH/text" --train-spm 500 --seq-len "$seq" --out "$SCRATCH/data" > /dev/null \
        || row train "prepare-data" FAIL "could not prepare the README as data"
    DATA="$SCRATCH/data"
fi
RUN="$SCRATCH/run"  # the 1.4B run saves ~17 GiB (weights + AdamW moments) at its end: RAM when there is room
shm_gib=$(df -Pk /dev/shm 2>/dev/null | awk 'NR == 2 {print int($4 / 1048576)}')
if [ $SMOKE -eq 0 ] && [ "${shm_gib:-0}" -ge 48 ]; then RUN=$(mktemp -d -p /dev/shm)/run; fi
if [ $SMOKE -eq 1 ]; then
    section train 120 "$PY" benchmarks/gpu_train_1b.py --smoke --steps 4 --data "$DATA" --out "$SCRATCH/run" \
        --results "$RES"
else
    section train 180 "$PY" benchmarks/gpu_train_1b.py --config configs/mamba_1.4b_hybrid.json --steps 20 \
        --seq-len 2048 --micro-batch 4 --data "$DATA" --out "$RUN" --results "$RES"
fi
[ -f "$RUN/metrics.jsonl" ] && cp "$RUN/metrics.jsonl" "$OUT/train-metrics.jsonl"
rm -rf "$(dirname "$RUN")"/run  # the 1.4B checkpoint: not needed, and the disk is small

# ---- the external libraries, once their builds are done (each build has its own deadline)
for pid in "${build_pids[@]}"; do wait "$pid"; done
for lib in causal-conv1d mamba-ssm; do
    rc=$(cat "$SCRATCH/build-$lib.rc" 2>/dev/null || echo missing)
    case $rc in
        0) row build "$lib CUDA extension" BUILT "$(tail -1 "$OUT/build-$lib.log")" ;;
        3) row build "$lib CUDA extension" "NOT CHECKED" "$(tail -1 "$OUT/build-$lib.log")" ;;
        124|137) row build "$lib CUDA extension" "NOT CHECKED" "build passed its ${build_limit[$lib]} s deadline (build-$lib.log)" ;;
        *) row build "$lib CUDA extension" "NOT CHECKED" "build failed (rc $rc): see build-$lib.log" ;;
    esac
done
if [ $SMOKE -eq 1 ]; then
    section cuda 60 "$PY" benchmarks/gpu_check.py --group cuda --smoke --results "$RES"
else
    section cuda 120 "$PY" benchmarks/gpu_check.py --group cuda --results "$RES"
fi

# ---- summary
"$PY" benchmarks/gpu_summary.py "$RES" | tee "$OUT/summary.txt"
rc=${PIPESTATUS[0]}
echo "gpu_check: $(($(date +%s) - T0)) s; results in $OUT"
exec > /dev/null 2>&1  # let tee write the log's last lines before the folder is collected
wait "$TEE_PID" 2>/dev/null
exit "$rc"
