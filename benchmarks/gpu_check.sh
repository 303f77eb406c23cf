#!/usr/bin/env bash
# Every GPU measurement of this project, in one run of under 10 minutes on one CUDA GPU.
#
#   bash benchmarks/gpu_wheels.sh          # here, with internet: the wheels a bare GPU image lacks -> .whl/
#   bash benchmarks/gpu_check.sh           # there: installs .whl/*.whl if present, then measures
#
# Writes everything it prints to $OUT/gpu_check.log (OUT defaults to ./gpu_check_out). DEVICE=cpu
# SECONDS_CLIP=2 runs the same steps on the CPU at a toy size, to check the script itself.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_check_out}"
DEVICE="${DEVICE:-cuda}"
SECONDS_CLIP="${SECONDS_CLIP:-30}"
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"

if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi

step() {  # step NAME SECONDS COMMAND...: run with a time limit; a failure is logged and the script goes on
    local name=$1 limit=$2; shift 2
    echo "=== $name (limit ${limit} s) ===" | tee -a "$LOG"
    local t0=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
    echo "--- $name: exit ${PIPESTATUS[0]}, $((SECONDS - t0)) s" | tee -a "$LOG"
}

{ date; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi";
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"; } | tee "$LOG"

# inference: a 30 s 720p clip cold (sparse lbp detection; box given), then from a saved avatar, fp32 and fp16
step "inference ${SECONDS_CLIP} s 720p" 210 "$PY" benchmarks/inference_benchmark.py --device "$DEVICE" \
    --only engine --cold sparse box --seconds "$SECONDS_CLIP" --workdir /tmp/wav2lip_gpu --json "$OUT/inference.json"
# S3FD frames/s (fp32, fp16; full size and --det_scale 0.5), generated weights unless s3fd.pth is there
S3FD=face_detection/detection/sfd/s3fd.pth
step "S3FD" 45 "$PY" benchmarks/inference_benchmark.py --device "$DEVICE" --only s3fd --workdir /tmp/wav2lip_gpu \
    $( [ -f "$S3FD" ] && echo --s3fd_path "$S3FD" )
# training throughput, 96 and 288 layouts, bf16 autocast
step "training" 150 "$PY" benchmarks/training_benchmark.py --device "$DEVICE" --presets 96 288 --amp bf16 --steps 40
# the real-time server: sessions at real-time pace, up to 64
if [ -f benchmarks/serve_benchmark.py ]; then
    if [ "$DEVICE" = cuda ]; then
        step "serve" 120 "$PY" benchmarks/serve_benchmark.py --device cuda --sessions 1 8 32 64
    else  # the script check: the tiny generator, short clients
        step "serve" 120 "$PY" benchmarks/serve_benchmark.py --device cpu --models tiny --seconds 3 --sessions 1 2
    fi
fi
echo "log: $LOG"
