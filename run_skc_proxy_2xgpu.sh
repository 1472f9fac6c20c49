#!/usr/bin/env bash
# A 2-GPU proxy of the competition run at reduced width: configs/proxy_2xgpu.env
# over configs/skc_competition.env, same data, same 10-minute cap.
#   ./run_skc_proxy_2xgpu.sh [--dry-run]
set -euo pipefail
cd "$(dirname "$0")"
source scripts/lib/launch.sh
load_env_file configs/proxy_2xgpu.env
load_env_file configs/skc_competition.env
run_launcher skc_proxy_2xgpu 2 "$@"
