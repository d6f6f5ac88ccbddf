#!/usr/bin/env bash
# The real-pair evaluation behind docs/results/eval (SmolLM2-135M + Gemma-3-270M, main Gemma-3).
# Every step resumes: rerun the script after an interruption and finished questions are kept.
# Sizes are what a 2-core CPU does in two sessions: 500 test questions per task, except GSM8K
# (30 questions, chain of thought capped at 128 tokens); see docs/results/eval/README.md.
# A larger --limit draws a sample that contains the smaller one (checked for these sizes), so
# raising a size and rerunning resumes into it.
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
# TriviaQA and NQ: dev for eta and Adapt's weights, then test
$E --task triviaqa --split dev --limit ${QA_DEV:-40} --method single,deepen-avg --eta ${QA_ETAS:-0.15,0.6}
$E --task triviaqa --split test --limit ${QA_TEST:-500} --eta dev --batch 16 \
   --method single,deepen-avg,deepen-adapt,minED,mbr,deepen+mbr
$E --task nq --split dev --limit ${QA_DEV:-40} --method single,deepen-avg --eta ${NQ_ETAS:-0.15}
$E --task nq --split test --limit ${NQ_TEST:-500} --eta dev --batch 16 \
   --method single,deepen-avg,deepen-adapt,minED,mbr,deepen+mbr
# GSM8K: chain of thought (the paper allows 512 new tokens): a small sample (see the README);
# the members alone on dev give DEEPEN-Adapt its weights
$E --task gsm8k --split dev --limit ${GSM_DEV:-20} --batch 20 --max-new-tokens ${GSM_TOKENS:-128} --method single
$E --task gsm8k --split test --limit ${GSM_TEST:-30} --batch 20 --max-new-tokens ${GSM_TOKENS:-128} \
   --method single,deepen-avg,deepen-adapt,minED,vote,deepen+vote
deepen report $OUT --out docs/results/eval
