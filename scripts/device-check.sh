#!/usr/bin/env bash
# The GPU check: one prepared script for a machine with one GPU, no network, 10 minutes a command
# and at most 8 result files, whose python may have an older transformers and no deepspeed.
#
#   bash scripts/device-wheels.sh                   # here, with network: .whl/ (deepspeed, transformers ...)
#   bash scripts/device-check.sh OUT                # there, with .whl carried along with the tree
#   DRY_RUN=1 PYTHON=.venv/bin/python bash scripts/device-check.sh OUT   # the same plumbing on the CPU
#
# Results: exactly two files in OUT, whatever happens: summary.md (a line per step as it ends, with
# its figures) and results.tar.gz (every step's log and JSON, made again after each step).
# Steps and their timeouts, 540 s in all (a command gets 600):
#   wheels 60, preflight 30, cuda-tests 120, bench-tiny 60, shapes 60, shapes-anchors 50,
#   bench-shapes 80, scale 80
# No CUDA, no deepspeed or a transformers outside the tested range (runtime/versions.py) stops it
# at the preflight, in one line. A skipped test counts as a failure. DRY_RUN=1 runs every step on
# the CPU with small workloads (CUDA not required; the half-precision tests stand in for the CUDA
# ones, which would all be skipped).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-device-check}}
DRY=${DRY_RUN:-0}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
rm -f "$OUT/summary.md" "$OUT/results.tar.gz"
SUMMARY=$OUT/summary.md
WORK=$(mktemp -d /tmp/device-check.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/results"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONPATH=$PWD
export DEEPEN_HOME=${DEEPEN_HOME:-$WORK/home}
T0=$(date +%s)
FAILED=()
# the steps' timeouts (seconds): they must add up to at most 540
declare -A LIMIT=([wheels]=60 [preflight]=30 [cuda-tests]=120 [bench-tiny]=60 [shapes]=60 [shapes-anchors]=50
                  [bench-shapes]=80 [scale]=80)
TOTAL=0; for n in "${!LIMIT[@]}"; do TOTAL=$((TOTAL + LIMIT[$n])); done
[ $TOTAL -le 540 ] || { echo "device-check: the timeouts add up to $TOTAL s, over 540" >&2; exit 2; }

say() { echo "$*" | tee -a "$SUMMARY"; }
archive() {   # the step's files so far, in one archive (written beside, then renamed)
  tar -czf "$OUT/results.tar.gz.part" -C "$WORK/results" . && mv "$OUT/results.tar.gz.part" "$OUT/results.tar.gz"
}
# step NAME COMMAND...: run it under its timeout, stdout in results/NAME.out, stderr in NAME.log;
# one line in the summary
step() {
  local name=$1 limit=${LIMIT[$1]} start code verdict
  shift
  start=$(date +%s)
  timeout "$limit" "$@" > "$WORK/results/$name.out" 2> "$WORK/results/$name.log"
  code=$?
  case $code in
    0) verdict=ok ;;
    124) verdict="timed out (limit $limit s)" ;;
    *) verdict="failed (exit $code)" ;;
  esac
  [ $code = 0 ] || FAILED+=("$name")
  say "- $name: $verdict, $(( $(date +%s) - start )) s (limit $limit s); at $(( $(date +%s) - T0 )) s"
  archive
  return $code
}
figures() { [ -s "$1" ] && { echo; grep -v '^\[20' "$1"; echo; } >> "$SUMMARY"; archive; }

say "# device check $(date -u +%Y-%m-%dT%H:%M:%SZ)$([ "$DRY" = 1 ] && echo ' (DRY_RUN: on the CPU, small workloads)')"
if [ "$DRY" = 1 ]; then
  DEV=cpu; BATCH=1,4; TOKENS=4; REPEAT=1; SCALE=0.02; DTYPE=float32; TESTS=(tests/test_half_precision.py)
else
  DEV=cuda; BATCH=1,8,32,64; TOKENS=16; REPEAT=2; SCALE=1; DTYPE=bfloat16; TESTS=(tests/test_cuda.py tests/test_half_precision.py)
fi

# 1. the carried wheels (scripts/device-wheels.sh), into a folder of their own
if ls .whl/*.whl >/dev/null 2>&1; then
  step wheels "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$WORK/site" .whl/*.whl
  export PYTHONPATH=$WORK/site:$PWD
  # the deepspeed launcher is a script in the wheel; put one on the PATH next to python
  mkdir -p "$WORK/bin" && printf '#!/bin/sh\nexec %s -m deepspeed.launcher.runner "$@"\n' "$(command -v "$PY")" \
    > "$WORK/bin/deepspeed" && chmod +x "$WORK/bin/deepspeed" && export PATH=$WORK/bin:$PATH
else
  say "- wheels: no .whl folder (scripts/device-wheels.sh makes it): using the installed packages"
fi

# 2. what the rest needs, or one line saying what is missing
cat > "$WORK/preflight.py" <<'EOF'
import os, platform, sys
import torch
dry = os.environ.get("DRY_RUN") == "1"
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), {os.cpu_count()} cores")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"GPU {p.name}, {p.total_memory / 2**30:.0f} GiB, bf16 {torch.cuda.is_bf16_supported()}")
from runtime.versions import check_versions, installed
print(f"transformers {installed('transformers')}, deepspeed {installed('deepspeed')}")
carry = "; carry the wheels of scripts/device-wheels.sh (.whl) with the tree"
problem = None if dry or torch.cuda.is_available() else (
    f"CUDA is not available to torch {torch.__version__} (built for CUDA {torch.version.cuda})")
if problem is None and check_versions():
    problem = check_versions() + carry
if problem is None:
    try:
        import deepspeed  # noqa: F401
    except Exception as e:  # noqa: BLE001
        problem = f"deepspeed does not import: {type(e).__name__}: {e}{carry}"
if problem:
    print(f"STOP: {problem}")
    sys.exit(1)
EOF
export DRY_RUN=$DRY
if ! step preflight "$PY" "$WORK/preflight.py"; then
  why=$(grep -h '^STOP: ' "$WORK/results/preflight.out" | cut -c7-)
  say "device-check: stopped: ${why:-$(tail -n 1 "$WORK/results/preflight.log")}"
  exit 1
fi
figures "$WORK/results/preflight.out"

# 3. the CUDA tests (DRY_RUN: the half-precision ones); a skip is a failure here
step cuda-tests "$PY" -m pytest -q -p no:cacheprovider -rA "${TESTS[@]}"
say "  $(tail -n 1 "$WORK/results/cuda-tests.out")"
if grep -qE "[0-9]+ skipped" "$WORK/results/cuda-tests.out"; then
  FAILED+=("cuda-tests (skipped tests)")
  say "  skipped tests count as failures here: $(grep -E '^SKIPPED' "$WORK/results/cuda-tests.out" | head -n 3 | tr '\n' ' ')"
fi

# 4. deepen bench on the device, tiny members
step bench-tiny "$PY" -m launcher.cli bench --config configs/tiny.toml --device $DEV --batch $BATCH \
  --new-tokens $TOKENS --repeat $REPEAT --compare members --prompts examples/bench-prompts.jsonl \
  --output "$WORK/results/bench-tiny.json"
figures "$WORK/results/bench-tiny.out"

# 5. random-weight members of the real shapes (Gemma-3-270M main + SmolLM2-135M), anchors on the device
SHAPES=$WORK/shapes
step shapes "$PY" -m runtime.bench.synthetic --out "$SHAPES" --dtype $DTYPE --scale $SCALE \
  && step shapes-anchors "$PY" -m launcher.cli anchors build "$SHAPES/shapes.toml" --device $DEV \
  && step bench-shapes "$PY" -m launcher.cli bench --config "$SHAPES/shapes.toml" --device $DEV --batch $BATCH \
    --new-tokens $TOKENS --repeat $REPEAT --compare members --prompts examples/bench-prompts.jsonl \
    --output "$WORK/results/bench-shapes.json"
figures "$WORK/results/bench-shapes.out"

# 6. the fused step at 70B-class scale (128k x 8192 main, 152k x 8192 assist, 100k anchors); its
# figures are written after every row, so a timeout keeps what was measured
DEVICES=$([ "$DRY" = 1 ] && echo cpu || echo cuda,cpu)
step scale "$PY" -m runtime.bench.scale --devices $DEVICES --batch ${BATCH%,64} --scale $SCALE --budget 30 \
  --repeat $REPEAT --output "$WORK/results/scale.json"
figures "$WORK/results/scale.md"

say "done in $(( $(date +%s) - T0 )) s; the timeouts add up to $TOTAL s; failed: ${FAILED[*]:-none}"
[ ${#FAILED[@]} = 0 ]
