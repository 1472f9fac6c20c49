#!/usr/bin/env bash
# The unlimited-compute (non-record) track: configs/skc_unlimited.env over configs/skc_competition.env on one
# node of 8 GPUs. No wall-clock cap (schedules run by steps), periodic checkpoints, and RESUME_FROM=auto: rerun
# the same command after a crash or a lost pod and training continues from the newest valid
# checkpoint in LOG_DIR/<RUN_ID>_checkpoints. So the RUN_ID is stable (no date in it): skc_unlimited_seed<SEED>.
#   ./run_skc_unlimited_8xh100.sh             train, or resume the run of the same RUN_ID
#   ./run_skc_unlimited_8xh100.sh --dry-run   validate the config only
set -euo pipefail
cd "$(dirname "$0")"
source scripts/lib/launch.sh
export RESUME_FROM=${RESUME_FROM-auto}  # before the env files, which leave it empty; RESUME_FROM= starts over
load_env_file configs/skc_unlimited.env
load_env_file configs/skc_competition.env
export RUN_ID=${RUN_ID:-skc_unlimited_seed${SEED}}
run_launcher skc_unlimited 8 "$@"
