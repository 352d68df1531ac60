#!/usr/bin/env bash
# The prepared GPU check (tools/GPU_CHECK.md): on one H100 / H200, in under 8 minutes of wall time,
#   1. installs what is missing (from the wheels in .whl/ when they travel, else from the index),
#      prints the versions and nvidia-smi;
#   2. runs the tests marked `cuda` (tests/test_cuda.py);
#   3. benchmarks ViT-B/16 DeepMIM-CLIP (random CLIP tower) at batch 128, one process per row: the
#      reference's settings (eager fp16, foreach AdamW), eager bf16 (the defaults), MAE's recipe,
#      fine-tuning ViT-B, ViTDet's Mask R-CNN on ViT-B at 1024 (2 images), and bf16 + compile (last: the
#      deadline may cut it);
#   4. writes six small files into OUT_DIR: env.txt, tests.log, junit.xml, bench.log, bench.json, summary.json.
#
# On the GPU node, from the repo root:
#   bash tools/gpu_check.sh OUT_DIR
# (step 1 installs from .whl/ itself, only what the node lacks). For an air-gapped node, once, on a
# machine with PyPI: `make gpu-wheels` (writes .whl/). On CPU, every line with tiny settings:
#   bash tools/gpu_check.sh --dry-run output_dir/gpu_check_dry      (or: make gpu-check DRY_RUN=1)
# GPU_CHECK_PARTS="tests" or "bench" reruns one part (setup always runs); PYTHON picks the interpreter.
set -uo pipefail

DRY=${GPU_CHECK_DRY_RUN:-0}
if [[ "${1:-}" == "--dry-run" ]]; then DRY=1; shift; fi
if [[ $# -ne 1 ]]; then
    echo "usage: bash tools/gpu_check.sh [--dry-run] OUT_DIR" >&2
    exit 2
fi
cd "$(dirname "$0")/.." || exit 2
mkdir -p "$1" && OUT=$(cd "$1" && pwd) || exit 2
rm -f "$OUT"/{env.txt,tests.log,junit.xml,bench.log,bench.json,summary.json}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX") || exit 2
trap 'rm -rf "$WORK"' EXIT
# every temporary file of the parts (pytest's folders, the benchmark's random CLIP towers of 330 MB each,
# compile caches) goes under WORK and goes with it
mkdir -p "$WORK/tmp" && export TMPDIR="$WORK/tmp"
PARTS=${GPU_CHECK_PARTS:-tests bench}
SUMMARY_OPTS=()
((DRY)) && SUMMARY_OPTS+=(--dry_run)
if [[ -z "${PYTHON:-}" ]]; then
    # .venv only where it works (a checkout's .venv link dangles on a machine it was copied to)
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
# the checkout itself on the path too: a GPU node runs it without `make install` (the editable install
# that lets `python tools/x.py` import the project), and its Python gets nothing installed
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:$WORK/site${PYTHONPATH:+:$PYTHONPATH}"

# time budget, seconds (tools/GPU_CHECK.md): each part's limit, and a deadline none of them passes
# (the dry run compiles on the CPU: longer)
TOTAL=${GPU_CHECK_TOTAL_S:-$( ((DRY)) && echo 900 || echo 420)}
DEADLINE=$((SECONDS + TOTAL))
T_SETUP=40 T_TESTS=150 T_TEST=100 T_ROW=40 T_COMPILE=150

part() {  # part NAME LIMIT_S LOG COMMAND...: run COMMAND under a time limit, log its output, record rc and seconds
    local name=$1 limit=$2 log=$3 t0=$SECONDS rc
    shift 3
    ((limit > DEADLINE - SECONDS)) && limit=$((DEADLINE - SECONDS))
    if ((limit < 10)); then
        echo "== $name: skipped, the ${TOTAL}s budget is spent" | tee -a "$log"
        printf '%s\tskipped\t0\t%s\n' "$name" "$limit" >>"$WORK/parts.tsv"
        return
    fi
    echo "== $name (limit ${limit}s): $*" | tee -a "$log"
    timeout --kill-after=10 "$limit" "$@" >>"$log" 2>&1
    rc=$?
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" "$limit" >>"$WORK/parts.tsv"
    echo "== $name: rc $rc after $((SECONDS - t0))s" | tee -a "$log"
}

setup() {
    date -u
    uname -a
    "$PYTHON" --version
    nvidia-smi 2>/dev/null || echo "nvidia-smi: none here"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,temperature.gpu,power.draw \
        --format=csv 2>/dev/null
    "$PYTHON" tools/gpu_check.py install --wheels .whl --target "$WORK/site" || return
    "$PYTHON" tools/gpu_check.py env || return
    if ((!DRY)); then
        "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 3)" ||
            { echo "error: torch sees no CUDA device; on CPU run with --dry-run"; return 3; }
    fi
}

# ---- 1. setup (a function: `timeout` runs it in a child bash)
export -f setup
export PYTHON WORK DRY
part setup "$T_SETUP" "$OUT/env.txt" bash -c setup
if [[ "$(tail -n 1 "$WORK/parts.tsv" | cut -f2)" != 0 ]]; then
    tail -n 5 "$OUT/env.txt"
    "$PYTHON" tools/gpu_check.py summary --out "$OUT" --work "$WORK" "${SUMMARY_OPTS[@]}"
    exit 1
fi

# ---- 2. the cuda tests: parallel workers, and a per-test limit (so that pytest ends and writes junit.xml),
# where the plugins are there (the GPU image has both)
TEST_OPTS=()
"$PYTHON" -c "import xdist" 2>/dev/null && TEST_OPTS+=(-n 4)
"$PYTHON" -c "import pytest_timeout" 2>/dev/null && TEST_OPTS+=(--timeout "$T_TEST")
if [[ " $PARTS " == *" tests "* ]]; then
    part tests "$T_TESTS" "$OUT/tests.log" "$PYTHON" -m pytest tests/test_cuda.py -m cuda -rA -p no:cacheprovider \
        --junitxml "$OUT/junit.xml" "${TEST_OPTS[@]}"
fi

# ---- 3. the benchmark rows: ViT-B/16 at 224, batch 128 (DeepMIM-CLIP with a random CLIP tower)
PRETRAIN=(--model deepmim_vit_base_patch16 --batch_size 128)
FINETUNE=(--model vit_base_patch16 --batch_size 128)
DETECT=(--batch_size 2)  # ViTDet's Mask R-CNN on ViT-B at 1024 (the recipe: 1 image per GPU)
ITERS=(--warmup 3 --steps 20 --rounds 2)
REF_AMP=fp16
if ((DRY)); then  # the same rows, tiny, on CPU (fp16 autocast needs CUDA: the reference row takes bf16)
    PRETRAIN=(--model deepmim_vit_tiny_patch4 --input_size 16 --batch_size 4 --decoder_depth 1 --device cpu)
    FINETUNE=(--model vit_tiny_patch4 --input_size 16 --batch_size 4 --device cpu)
    DETECT=(--model vitdet_mask_rcnn_vit_tiny_patch4 --batch_size 2 --device cpu)
    ITERS=(--warmup 1 --steps 2 --rounds 1)
    REF_AMP=bf16
    T_COMPILE=400  # compiling on two CPU cores
fi

row() {  # row NAME LIMIT_S MODE FLAGS...: one benchmark setting in its own process (its own peak memory)
    local name=$1 limit=$2 mode=$3 base extra=()
    shift 3
    case $mode in
        pretrain) base=("${PRETRAIN[@]}") extra=(--random_clip) ;;
        finetune) base=("${FINETUNE[@]}") ;;
        detect) base=("${DETECT[@]}") ;;
    esac
    part "bench_$name" "$limit" "$OUT/bench.log" "$PYTHON" tools/benchmark.py --mode "$mode" "${extra[@]}" \
        "${ITERS[@]}" --json "$WORK/bench_$name.json" -- "${base[@]}" "$@"
}
if [[ " $PARTS " == *" bench "* ]]; then
    row reference "$T_ROW" pretrain --amp "$REF_AMP" --no-fused_adamw
    row default "$T_ROW" pretrain --amp bf16
    row mae "$T_ROW" pretrain --amp bf16 --ds_layers 12 --decoder_depth 8
    row finetune "$T_ROW" finetune --amp bf16
    row detect "$T_ROW" detect --amp bf16
    row compile "$T_COMPILE" pretrain --amp bf16 --compile  # last: compiling takes the longest, the deadline cuts it
fi

# ---- 4. summary.json and bench.json; the table last
"$PYTHON" tools/gpu_check.py summary --out "$OUT" --work "$WORK" "${SUMMARY_OPTS[@]}"
rc=$?
echo "files in $OUT: $(ls "$OUT" | tr '\n' ' ')(${SECONDS}s in all)"
exit $rc
