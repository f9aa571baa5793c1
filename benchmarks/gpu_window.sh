#!/usr/bin/env bash
# One call on a lent GPU machine: the engine's throughput figures (issue 22) and a T1w training
# window that continues the shipped network (issue 23); everything else runs on a CPU.
#
# Here, once:   make gpu-carry            (nibabel wheel + 1 mm anatomy bank into .gpu/, ~12 MB)
# The device:   run(command="bash benchmarks/gpu_window.sh", carry=[".gpu"], timeout_s=600)
# Afterwards:   the files under $OUT (throughput table, training log and table, the new
#               weights.pt + model_card.json) come back; calibrate and evaluate the weights on
#               a CPU (docs/benchmarks.md section 2) before shipping them.
#
# The device image has torch, numpy and scipy but not nibabel (read by the model folder's
# normal-error maps), and it holds no installed copy of this project: the repository root goes
# on PYTHONPATH. Each step has its own time limit, so that a slow step never costs the next
# one's output, and the script ends inside the 600 s a call may run.
# Environment: DEVICE (cuda), SCANS (64), BATCHES ("1 16 64"), TRAIN_MINUTES (6),
# TRAIN_ARGS (extra train_dr_window.py options), OUT (set by the device tool).
set -u -o pipefail
OUT=${OUT:-/tmp/gpu_window_out}
DEVICE=${DEVICE:-cuda}
SCANS=${SCANS:-64}
BATCHES=${BATCHES:-"1 16 64"}
TRAIN_MINUTES=${TRAIN_MINUTES:-6}
# clinical 2D stacks (3-6 mm slices) are where the engine is weakest (docs/benchmarks.md,
# "Clinical 2D acquisitions"); the shipped network saw thick slices in one head of five, 2-5 mm
TRAIN_ARGS=${TRAIN_ARGS:-"--thick-slice-p 0.35 --thick-slice-mm 2 6.5"}
WORK=${WORK:-/tmp/gpu_window_work}
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1 NIPYPE_NO_ET=1
PY=${PY:-python3}

if ! "$PY" -c "import nibabel" 2>/dev/null; then
    ls .gpu/*.whl > /dev/null 2>&1 || { echo "no nibabel and no .gpu/*.whl: run 'make gpu-carry' here first"; exit 2; }
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" .gpu/*.whl \
        || { echo "installing the carried wheels failed"; exit 2; }
    export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
BANK=${BANK:-.gpu/bank1mm.npz}
[ -f "$BANK" ] || { echo "no anatomy bank at $BANK: run 'make gpu-carry' here first"; exit 2; }

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
    "$PY" -c 'import torch, platform; print("torch", torch.__version__, "cuda", torch.version.cuda, "python", platform.python_version()); print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device")'
} 2>&1 | tee "$OUT/machine.txt"

# shellcheck disable=SC2086  # BATCHES is a list of numbers
timeout 180 "$PY" benchmarks/engine_throughput.py --device "$DEVICE" --scans "$SCANS" --batch $BATCHES 2>&1 \
    | tee "$OUT/engine_throughput.txt"
echo "engine_throughput rc=$?" | tee -a "$OUT/engine_throughput.txt"

LIMIT=$(awk -v m="$TRAIN_MINUTES" 'BEGIN { printf "%d", m * 60 + 150 }')
# shellcheck disable=SC2086  # TRAIN_ARGS holds several options
timeout "$LIMIT" "$PY" benchmarks/train_dr_window.py --bank "$BANK" --out "$WORK/train" --device "$DEVICE" \
    --minutes 0 "$TRAIN_MINUTES" --continue-from models/t1w $TRAIN_ARGS 2>&1 | tee "$OUT/train.txt"
echo "train_dr_window rc=$?" | tee -a "$OUT/train.txt"
for f in weights.pt model_card.json; do
    [ -f "$WORK/train/t1w/$f" ] && cp "$WORK/train/t1w/$f" "$OUT/t1w_$f"
done
[ -f "$WORK/train/window.json" ] && cp "$WORK/train/window.json" "$OUT/window.json"
ls -la "$OUT"
