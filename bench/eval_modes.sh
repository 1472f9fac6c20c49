#!/bin/bash
# Score an exported artifact without training: the plain round trip and every evaluation mode the settings switch
# on (sliding windows, score-first TTT, the EvalEngram n-gram memory), each with its exact val_bpb and its time.
# The same artifact and settings give the same figures run after run, so one artifact compares evaluation settings
# paired, without the noise of training.
#   bash bench/eval_modes.sh ENV_FILE ARTIFACT [VAR=value ...]      (the venv active)
#   bash bench/eval_modes.sh configs/cpu_proxy.env bench/out/logs/proxy_..._ours_seed1337_model.skc EVAL_ENGRAM=0
# Results: bench/ablations/proxy.md, "Evaluation modes".
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 2 ] || { echo "usage: bash bench/eval_modes.sh ENV_FILE ARTIFACT [VAR=value ...]"; exit 2; }
env_file=$1 artifact=$2
shift 2
[ -f "$artifact" ] || { echo "no artifact at $artifact (an exported <RUN_ID>_model.skc)"; exit 2; }
out=$(mktemp -d /tmp/eval_modes.XXXXXX)
( export EVAL_ARTIFACT="$artifact" RUN_ID=eval_modes LOG_DIR="$out" "$@"
  source scripts/lib/env.sh && load_env_file "$env_file" && python train_gpt.py > "$out/run.out" 2>&1 ) \
    || { echo "evaluation failed: $out/run.out"; exit 1; }
for mode in $(grep -oE '^final_\w+_exact' "$out/eval_modes.txt" | sed -E 's/^final_(\w+)_exact$/\1/'); do
    bpb=$(grep -E "^final_${mode}_exact " "$out/eval_modes.txt" | grep -oE 'val_bpb:\S+')
    seconds=$(grep -E "^final_${mode} val_loss" "$out/eval_modes.txt" | grep -oE 'eval_time:[0-9]+ms')
    echo "$mode $bpb $seconds"
done
echo "log: $out/eval_modes.txt; the last mode above is the score a submission with these settings reports"
