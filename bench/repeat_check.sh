#!/bin/bash
# Is training repeatable? Two runs of one configuration with the same seed and the same number of steps (no
# clock, so the schedule cannot differ), then their exact pre-export val_bpb and mean step time side by side.
#   bash bench/repeat_check.sh [ENV_FILE] [VAR=value ...]     (the venv active; nothing else running)
#   bash bench/repeat_check.sh configs/cpu_proxy.env DETERMINISTIC=1
# Results: bench/ablations/proxy.md, "Run-to-run repeatability".
set -euo pipefail
cd "$(dirname "$0")/.."
env_file=${1:-configs/cpu_proxy.env}
shift || true
out=$(mktemp -d /tmp/repeat_check.XXXXXX)
declare -A score
for rep in a b; do
    ( export ITERATIONS=30 MAX_WALLCLOCK_SECONDS=0 TRAIN_LOG_EVERY=10 VAL_MAX_TOKENS=16384 SEED=1337 \
          RUN_ID="repeat_$rep" LOG_DIR="$out" "$@"
      source scripts/lib/env.sh && load_env_file "$env_file" && python train_gpt.py > "$out/$rep.out" 2>&1 ) \
        || { echo "run $rep failed: $out/$rep.out"; exit 1; }
    score[$rep]=$(grep -h final_prequant_exact "$out/repeat_$rep.txt")
    echo "run $rep: ${score[$rep]} $(grep -o 'step_avg:[0-9.]*ms' "$out/repeat_$rep.txt" | tail -1)"
done
if [ "${score[a]}" = "${score[b]}" ]; then
    echo "repeatable: both runs scored the same to the last digit (logs: $out)"
else
    echo "NOT repeatable: the two runs differ (logs: $out)"
fi
