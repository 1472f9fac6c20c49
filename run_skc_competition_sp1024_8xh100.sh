#!/usr/bin/env bash
# The competition run on the 1024-token BPE: configs/skc_competition_sp1024.env over
# configs/skc_competition.env, one node of 8 GPUs.
#   ./run_skc_competition_sp1024_8xh100.sh [--dry-run]
set -euo pipefail
cd "$(dirname "$0")"
source scripts/lib/launch.sh
load_env_file configs/skc_competition_sp1024.env
load_env_file configs/skc_competition.env
run_launcher skc_competition_sp1024 8 "$@"
