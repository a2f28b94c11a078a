#!/usr/bin/env bash
# Issue 8's GPU checks as one command for a session lent a GPU (the device tool); docs/benchmarks.md records them.
#   here:        make gpu-wheels                                  (once: .whl/, git-ignored)
#   the device:  run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=560)
# It runs, each under its own time limit, writing logs and tables to $OUT:
#   1. the CUDA tests (noise and training draws on the device, fp16 sampling vs fp32);
#   2. benchmarks/sampling_speed.py at EDM2-XS and -S, batch 256, fp32/bf16/fp16, against the naive fp32 loop;
#   3. benchmarks/cuda_pipeline.py: encode, train-base, generate, finetune-aux, evaluate on CUDA (random VAE).
set -uo pipefail
OUT=${OUT:-out/gpu-check}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "gpu_check: installing .whl/ failed" >&2; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name())" | tee "$OUT/torch.txt"

status=0
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_devices.py tests/test_precision_speed.py \
  -k "cuda or fp16" 2>&1 | tee "$OUT/cuda-tests.log" || status=1
timeout 300 python3 benchmarks/sampling_speed.py --presets edm2-xs edm2-s --batch 256 --train-batch 64 \
  --steps 16 --repeats 3 2>&1 | tee "$OUT/sampling-speed.log" || status=1
timeout 240 python3 benchmarks/cuda_pipeline.py --out /tmp/cuda-pipeline --json "$OUT/cuda-pipeline.json" 2>&1 \
  | tail -40 | tee "$OUT/cuda-pipeline.log" || status=1
exit $status
