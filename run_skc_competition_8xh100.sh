#!/usr/bin/env bash
# The canonical competition run: configs/skc_competition.env on one node of 8 GPUs.
#   ./run_skc_competition_8xh100.sh             train (needs the FineWeb shards)
#   ./run_skc_competition_8xh100.sh --dry-run   validate the config only
#   ./run_skc_competition_8xh100.sh --script records/.../train_gpt.py   run an extracted file
# Any variable already in the environment wins over the env file.
set -euo pipefail
cd "$(dirname "$0")"
source scripts/lib/launch.sh
load_env_file configs/skc_competition.env
run_launcher skc_competition 8 "$@"
