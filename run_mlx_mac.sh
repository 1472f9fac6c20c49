#!/usr/bin/env bash
# The MLX twin on one Apple Silicon Mac: configs/mlx_mac.env, a small model, 10 minutes.
#   ./run_mlx_mac.sh             train (needs the sp1024 shards: python data/prepare.py download --variant sp1024 --train-shards 1)
#   ./run_mlx_mac.sh --dry-run   validate the config only
# Any variable already in the environment wins over the env file, e.g. NUM_LAYERS=8 ./run_mlx_mac.sh
set -euo pipefail
cd "$(dirname "$0")"
source scripts/lib/launch.sh
load_env_file configs/mlx_mac.env
parse_launcher_args "$@"
set_run_identity mlx_mac
echo "launch: run_id=$RUN_ID seed=$SEED data=$DATA_PATH tokenizer=$TOKENIZER_PATH log=$LOG_DIR/$RUN_ID.txt" \
     "dry_run=${DRY_RUN:-0}"
if [[ ${DRY_RUN:-0} != 0 ]]; then
    exec "${PYTHON:-python}" train_gpt_mlx.py
fi
require_data
mkdir -p "$LOG_DIR"
"${PYTHON:-python}" train_gpt_mlx.py 2>&1 | tee "$LOG_DIR/$RUN_ID.console.log"
