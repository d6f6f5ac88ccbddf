#!/usr/bin/env bash
# The GPU check (issue 12): one prepared script for a machine with one GPU, no network and only a
# copy of this repository (torch, transformers, safetensors, msgpack, click installed there).
# Under 8 minutes on one H100. Results go to OUT (an argument or the OUT variable) as JSON and
# markdown: gpu.txt, cuda-tests.txt, bench-tiny.{json,md}, bench-shapes.{json,md},
# scale.{json,md}, summary.md.
#
# Before (here, with network): bash scripts/device-wheels.sh   -> .whl/ (deepspeed, pydantic,
# hjson, transformers 5.24 ...: the wheels the GPU image lacks), then carry .whl with the tree:
#     bash scripts/device-check.sh "$OUT"
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-device-check}}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export DEEPEN_HOME=${DEEPEN_HOME:-/tmp/deepen-home}
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed" | tee "$OUT/summary.md"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
  # the deepspeed launcher is a script in the wheel; put it on the PATH next to python
  mkdir -p /tmp/site-bin && printf '#!/bin/sh\nexec %s -m deepspeed.launcher.runner "$@"\n' "$(command -v "$PY")" > /tmp/site-bin/deepspeed \
    && chmod +x /tmp/site-bin/deepspeed && export PATH=/tmp/site-bin:$PATH
else
  export PYTHONPATH=$PWD
fi
T0=$(date +%s)
step() { echo "== $(($(date +%s) - T0)) s: $*" | tee -a "$OUT/summary.md"; }

step "machine"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; "$PY" -c \
  "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'bf16', torch.cuda.is_bf16_supported(), 'transformers', transformers.__version__)"
  "$PY" -c "import deepspeed; print('deepspeed', deepspeed.__version__)"; nproc; } > "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt" >> "$OUT/summary.md"

step "CUDA tests and half precision (tests/test_cuda.py, tests/test_half_precision.py)"
timeout 240 "$PY" -m pytest -q -p no:cacheprovider -rA tests/test_cuda.py tests/test_half_precision.py \
  > "$OUT/cuda-tests.txt" 2>&1
echo "exit $?: $(tail -n 1 "$OUT/cuda-tests.txt")" >> "$OUT/summary.md"

step "deepen bench on the GPU, tiny members"
timeout 120 "$PY" -m launcher.cli bench --config configs/tiny.toml --device cuda --batch 1,8,32,64 \
  --new-tokens 16 --repeat 2 --compare members --prompts examples/bench-prompts.jsonl \
  --output "$OUT/bench-tiny.json" > "$OUT/bench-tiny.md" 2> "$OUT/bench-tiny.log"
echo "exit $?" >> "$OUT/summary.md"; cat "$OUT/bench-tiny.md" >> "$OUT/summary.md"

step "random-weight members of the real shapes (Gemma-3-270M main + SmolLM2-135M, bf16), anchors on the GPU"
SHAPES=/tmp/shapes
timeout 150 "$PY" -m runtime.bench.synthetic --out $SHAPES --dtype bfloat16 > "$OUT/shapes.log" 2>&1 \
  && timeout 120 "$PY" -m launcher.cli anchors build $SHAPES/shapes.toml --device cuda >> "$OUT/shapes.log" 2>&1
echo "exit $?: $(tail -n 3 "$OUT/shapes.log" | tr '\n' ' ')" >> "$OUT/summary.md"
timeout 150 "$PY" -m launcher.cli bench --config $SHAPES/shapes.toml --device cuda --batch 1,8,32,64 \
  --new-tokens 16 --repeat 2 --compare members --prompts examples/bench-prompts.jsonl \
  --output "$OUT/bench-shapes.json" > "$OUT/bench-shapes.md" 2> "$OUT/bench-shapes.log"
echo "exit $?" >> "$OUT/summary.md"; cat "$OUT/bench-shapes.md" >> "$OUT/summary.md"

step "the fused step at large-model scale (128k x 8192 main, 152k x 8192 assist, 100k anchors), GPU and CPU"
timeout 180 "$PY" -m runtime.bench.scale --devices cuda,cpu --batch 1,8,32 --budget 40 \
  --output "$OUT/scale.json" > "$OUT/scale.log" 2>&1
echo "exit $?" >> "$OUT/summary.md"; cat "$OUT/scale.md" >> "$OUT/summary.md" 2>/dev/null
step "done"
