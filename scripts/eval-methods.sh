#!/usr/bin/env bash
# The three methods side by side on the real pair (SmolLM2-135M + Gemma-3-270M, main Gemma-3):
# DEEPEN-Avg, UniTE and GaC, each with its settings chosen on dev (its "no fusion" setting among
# them: eta 0 for DEEPEN, gate 0 for UniTE and GaC), next to the members and the baselines.
# Every step resumes: rerun after an interruption and finished questions are kept. A setting that
# never fuses decodes as the main member alone (its texts are reused, marked `decoded_as`).
# Results: docs/results/eval/methods.md (issue 22). PHASES picks what runs (default: all).
set -euo pipefail
C=${CONFIG:-configs/smol-gemma.toml}
OUT=${OUT:-results/smol-gemma-methods}
DEV=${DEV:-200}
TEST=${TEST:-500}
ETAS=${ETAS:-0,0.05,0.15,0.3,0.6,1.0}
GATES=${GATES:-0,0.3,0.5,0.7,0.9,1}
QA_DEV=${QA_DEV:-40}
QA_ETAS=${QA_ETAS:-0,0.15,0.6}
QA_GATES=${QA_GATES:-0,0.5,0.9,1}
THREADS=${THREADS:-1}
PHASES=${PHASES:-"piqa arc_challenge triviaqa nq mmlu"}
E="deepen eval --config $C --out $OUT --resume --threads $THREADS"

for task in $PHASES; do
  case $task in
    piqa|arc_challenge|mmlu)
      dev=$DEV; [ $task = mmlu ] && dev=${MMLU_DEV:-100}   # MMLU's 5-shot prompts are 4x longer
      # dev: one prefill per question serves every setting of a command
      $E --task $task --split dev --limit $dev --method single,deepen-avg --eta $ETAS
      $E --task $task --split dev --limit $dev --method unite,gac --gate $GATES
      $E --task $task --split test --limit $TEST --gate dev \
         --method single,deepen-avg,unite,gac,minED,vote,deepen+vote ;;
    triviaqa|nq)
      $E --task $task --split dev --limit $QA_DEV --batch 16 --method single,deepen-avg --eta $QA_ETAS
      $E --task $task --split dev --limit $QA_DEV --batch 16 --method single,unite,gac --gate $QA_GATES
      $E --task $task --split test --limit $TEST --batch 16 --gate dev \
         --method single,deepen-avg,unite,gac,mbr,deepen+mbr ;;
  esac
done
deepen report $OUT --out docs/results/eval/methods
