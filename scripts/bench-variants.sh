#!/usr/bin/env bash
# The fused-step variants of docs/performance.md ("Cutting the fused step"), one after the other:
# copies of configs/smol-gemma.toml with one [anchors] line changed, each benched at batch 8.
#   bash scripts/bench-variants.sh OUT_DIR          (VARIANTS="all-off default": just those)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: bench-variants.sh OUT_DIR}
mkdir -p "$OUT"
DEEPEN=${DEEPEN:-.venv/bin/deepen}
variant() {  # name, extra [anchors] lines
  python3 - "$OUT/$1.toml" "$2" <<'PY'
import sys
base = open("configs/smol-gemma.toml").read()
open(sys.argv[1], "w").write(base.replace("max_support = 256\n", "max_support = 256\n" + sys.argv[2]))
PY
}
variant before $'skip_decided = false\nrow_product = "fp32"\n'
variant decided-fp32 $'row_product = "fp32"\n'
variant default ''
variant no-row-cache ''
sed -i 's/^row_cache = 512/row_cache = 0/' "$OUT/no-row-cache.toml"
variant agreement-skip $'skip_agreeing = true\n'
# everything this issue added that can still be switched off: decided rows, bf16 rows, the row store
variant all-off $'skip_decided = false\nrow_product = "fp32"\n'
sed -i 's/^row_cache = 512/row_cache = 0/' "$OUT/all-off.toml"
for v in ${VARIANTS:-before decided-fp32 default no-row-cache agreement-skip all-off}; do
  "$DEEPEN" bench --config "$OUT/$v.toml" --batch 8 --new-tokens 16 --repeat 2 --compare members \
    --output "$OUT/bench-$v.json" | tee "$OUT/bench-$v.md"
done
