#!/usr/bin/env bash
# The real-pair evaluation behind docs/results/eval (SmolLM2-135M + Gemma-3-270M, main Gemma-3).
# Every step resumes: rerun the script after an interruption and finished questions are kept.
# Sizes are set by what a 2-core CPU does in a session (TEST=500 per multiple-choice task,
# TriviaQA 100, NQ 60, GSM8K 10 x 128 tokens); see docs/results/eval/README.md.
set -euo pipefail
C=${CONFIG:-configs/smol-gemma.toml}
OUT=${OUT:-results/smol-gemma}
DEV=${DEV:-200}
TEST=${TEST:-500}
ETAS=${ETAS:-0.05,0.15,0.3,0.6,1.0,2.0}
E="deepen eval --config $C --out $OUT --resume"

for task in piqa arc_challenge mmlu; do
  # dev: the members alone (DEEPEN-Adapt's weights) and the eta sweep, from one prefill per question
  dev=$DEV; [ $task = mmlu ] && dev=${MMLU_DEV:-100}  # MMLU's 5-shot prompts are 4x longer
  $E --task $task --split dev --limit $dev --method single,deepen-avg --eta $ETAS
  $E --task $task --split test --limit $TEST --eta dev \
     --method single,deepen-avg,deepen-adapt,minED,vote,deepen+vote
  # the letters-only variant, from the singles' files (no extra prefill)
  $E --task $task --split dev --limit $dev --method deepen-letters --eta $ETAS
  $E --task $task --split test --limit $TEST --method deepen-letters --eta dev
done
# TriviaQA and NQ: this session's sizes (see the README); QA_TEST / NQ_TEST raise them
$E --task triviaqa --split dev --limit ${QA_DEV:-40} --method single,deepen-avg --eta ${QA_ETAS:-0.15,0.6}
$E --task triviaqa --split test --limit ${QA_TEST:-100} --eta dev --batch 16 \
   --method single,deepen-avg,deepen-adapt,minED,mbr,deepen+mbr
$E --task nq --split dev --limit ${QA_DEV:-40} --method single,deepen-avg --eta ${NQ_ETAS:-0.15}
$E --task nq --split test --limit ${NQ_TEST:-60} --eta dev --batch 16 \
   --method single,deepen-avg,deepen-adapt,minED,mbr,deepen+mbr
# GSM8K: chain of thought, up to 512 new tokens per question: a small sample (see the README)
$E --task gsm8k --split test --limit ${GSM_TEST:-10} --batch 10 --max-new-tokens ${GSM_TOKENS:-128} \
   --method single,deepen-avg,minED,vote,deepen+vote
deepen report $OUT --out docs/results/eval
