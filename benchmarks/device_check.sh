#!/usr/bin/env bash
# The GPU measurements still open, as one command for a machine with one CUDA device:
#
#     bash benchmarks/device_check.sh            # writes its logs to $OUT (default runs/device)
#
# 1. the scale-out issue's target: the NCSN++ CIFAR-10 cost matrix (256 noises x 100 Euler steps)
#    in fp32, TF32, fp16 / bf16 autocast with channels-last, and compiled fp16, each timed and
#    compared with fp32 (benchmarks/bench_cost_precision.py; at most 300 s);
# 2. the CLI's --precision options on the device (digits schedules: fp32, then tf32 / fp16 +
#    channels-last; at most 3 x 60 s);
# 3. row-keyed dropout against torch's on the device (benchmarks/bench_dropout.py, seconds);
# 4. only with GPU_CHECK=1 (a second device call: the limits above fill one 600 s call): the
#    library on the device against the CPU and the demo's wall time (benchmarks/gpu_check.py;
#    measured once already).
# About 4-6 minutes on one H200 (compilation included); each step has its own time limit (and a
# kill 15 s after it), so a slow step leaves the others' results. Runs from a source checkout without installing
# (PYTHONPATH=src): torch, numpy, safetensors and tqdm must be there already, and for the demo in
# gpu_check.py peft, matplotlib, pillow and scikit-learn (the H200 image has them all).
# Smoke test on a CPU machine: DEVICE=cpu MODEL=digits SAMPLES=16 GRID=10 bash benchmarks/device_check.sh
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/device}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 BOSSFLOW_PROGRESS=0
PY=${PYTHON:-python3}

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    $PY -c "import torch, bossflow; print('torch', torch.__version__, 'bossflow', bossflow.__version__)"
    # torch.compile's Triton builds its launcher with a C compiler and Python's headers
    echo "cc: $(command -v gcc || command -v cc || echo none)"
    $PY -c "import os, sysconfig; h = sysconfig.get_paths()['include']; print('Python.h:', os.path.exists(os.path.join(h, 'Python.h')))"
    $PY -c "import triton; print('triton', triton.__version__)" || true
} 2>&1 | tee "$OUT/machine.txt" || exit 1

DEVICE=${DEVICE:-cuda}
timeout -k 15 300 $PY benchmarks/bench_cost_precision.py --model "${MODEL:-rectified-flow-cifar10}" \
    --device "$DEVICE" --samples "${SAMPLES:-256}" --grid "${GRID:-100}" --batch-size 256 \
    --settings tf32,tf32-cl,fp16-cl,bf16-cl,fp16-cl-compile \
    2>&1 | tee "$OUT/cost_precision.md"

rm -rf /tmp/bossflow_cli_*  # fresh caches: each run is measured, not resumed
SCHED="$PY -m bossflow schedule --model digits --device $DEVICE --nfe 2,4 --kmax 50 --samples 256 --quiet"
precisions="fp16"
[ "$DEVICE" = cuda ] && precisions="tf32 fp16"
{
    # the reference in true fp32: on CUDA, PyTorch's default lets convolutions use TF32
    NVIDIA_TF32_OVERRIDE=0 timeout -k 15 60 $SCHED --out /tmp/bossflow_cli_fp32
    for p in $precisions; do
        timeout -k 15 60 $SCHED --precision "$p" --channels-last --out "/tmp/bossflow_cli_$p" &&
            $PY -c "import sys, numpy as np; from bossflow.bellman import CostMatrix as C
a, b = (C.load(f'/tmp/bossflow_cli_{n}/cost_matrix.npz').values for n in ('fp32', sys.argv[1]))
print(sys.argv[1], 'channels-last: cost matrix max rel. error vs fp32', np.abs(a - b).max() / np.abs(a).max())" "$p"
    done
} 2>&1 | tee "$OUT/cli_precision.txt"

timeout -k 15 60 $PY benchmarks/bench_dropout.py --device "$DEVICE" --batch 256 2>&1 | tee "$OUT/dropout.md"

if [ "$DEVICE" = cuda ] && [ "${GPU_CHECK:-0}" = 1 ]; then
    rm -rf /tmp/bossflow_gpu_check*  # the demos resume: a second run would time nothing
    timeout -k 15 330 $PY benchmarks/gpu_check.py --out /tmp/bossflow_gpu_check 2>&1 | tee "$OUT/gpu_check.md"
fi
