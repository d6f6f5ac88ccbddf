#!/usr/bin/env bash
# Issue 20's table, before and after, in one run: the tiny members (configs/tiny.toml) at batch 64,
# 48 new tokens, prompts of about 20, 60 and 180 words (the last words of the bench prompts, the
# question at the end). Three series per prompt length, interleaved: "before" (an earlier commit,
# default b3df20c, in a temporary git worktree), and this build's two host paths, "full" (whole
# rows re-encoded and decoded every step) and "incremental". Per step: ms, the assists' token sync
# (resync), the members' forward passes (prefill included), the fused step's math.
#
#   scripts/host-work.sh OUT_DIR [BASE_COMMIT] [REPEAT]
set -euo pipefail
OUT=${1:?usage: scripts/host-work.sh OUT_DIR [BASE_COMMIT] [REPEAT]}
BASE=${2:-b3df20c}
REPEAT=${3:-3}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-$ROOT/.venv/bin/python}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WT=$(mktemp -d)/base
git -C "$ROOT" worktree add --detach "$WT" "$BASE" >/dev/null
trap 'git -C "$ROOT" worktree remove --force "$WT" >/dev/null 2>&1 || true' EXIT
# the earlier commit's tiny members may be another format: each side keeps its own home
export DEEPEN_HOME_NEW=${DEEPEN_HOME:-$HOME/.cache/deepen} DEEPEN_HOME_OLD=$OUT/home-before

"$PY" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
sys.path.insert(0, ".")
from runtime.bench.bench import bench_prompts
out = Path(sys.argv[1])
for words in (20, 60, 180):
    with open(out / f"prompts-{words}.jsonl", "w") as f:
        for i, p in enumerate(bench_prompts()):
            f.write(json.dumps({"id": i, "prompt": " ".join(p.split(" ")[-words:])}) + "\n")
EOF

run() {  # run SIDE WORDS REPEAT-INDEX
  local side=$1 words=$2 r=$3 dir=$ROOT home=$DEEPEN_HOME_NEW path=incremental
  case $side in
    before) dir=$WT home=$DEEPEN_HOME_OLD ;;
    full) path=full ;;
  esac
  local extra=()
  [ "$side" = before ] || extra=(--host-path "$path")
  (cd "$dir" && DEEPEN_HOME=$home PYTHONPATH=$dir "$PY" -m launcher.cli bench --config configs/tiny.toml \
     --batch 64 --new-tokens 48 --repeat 1 --compare "" --prompts "$OUT/prompts-$words.jsonl" \
     "${extra[@]}" --output "$OUT/$side-$words-$r.json" >/dev/null 2>"$OUT/$side-$words-$r.log")
}
for r in $(seq 1 "$REPEAT"); do
  for words in 20 60 180; do
    for side in before full incremental; do
      echo "repeat $r/$REPEAT: $side, ~$words-word prompts" >&2
      run "$side" "$words" "$r"
    done
  done
done

"$PY" - "$OUT" "$REPEAT" <<'EOF'
import json, statistics, sys
from pathlib import Path
out, repeat = Path(sys.argv[1]), int(sys.argv[2])
sys.path.insert(0, ".")
from runtime.bench.bench import cpu_flags
print(f"CPU: {cpu_flags()}\n")
print("| prompt | side | ms per step | resync ms (share) | forward + prefill ms | fusion ms | host ms |")
print("|---|---|---|---|---|---|---|")
for words in (20, 60, 180):
    for side in ("before", "full", "incremental"):
        rows = []
        for r in range(1, repeat + 1):
            e = json.loads((out / f"{side}-{words}-{r}.json").read_text())["batches"][0]["ensemble"]
            step, share = e["step_s"]["median"], e["share"]
            fwd = sum(v for k, v in share.items() if k.startswith(("forward:", "prefill:")))
            fusion = sum(share.get(k, 0) for k in ("rules", "relative", "search"))
            rows.append((step, share.get("resync", 0), fwd, fusion))
        step, resync, fwd, fusion = (statistics.median(x) for x in zip(*rows))
        print(f"| ~{words} words | {side} | {1e3 * step:.1f} | {1e3 * step * resync:.1f} ({resync:.0%}) | "
              f"{1e3 * step * fwd:.1f} | {1e3 * step * fusion:.1f} | {1e3 * step * (1 - fwd - fusion):.1f} |")
EOF
