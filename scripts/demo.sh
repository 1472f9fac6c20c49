#!/usr/bin/env bash
# Fresh-machine demo: set up .venv, build the offline data (no network needed), train a small
# CPU model for about five minutes with configs/cpu_demo.env, then print val_bpb and artifact bytes.
# Any variable of configs/cpu_demo.env can be overridden from the environment.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
. scripts/shell_helpers.sh
. scripts/lib/env.sh
setup_venv "$ROOT"

DEMO_DATA=data/datasets/demo_stdlib
if [[ -f $DEMO_DATA/manifest.json ]]; then
  echo "demo data already built in $DEMO_DATA (delete that folder to rebuild)"
else
  python data/prepare.py build --spec sp_bpe_1024 --out "$DEMO_DATA" --val-docs 60
fi

if ! grep -q '^def main' train_gpt.py; then
  echo "trainer not implemented yet: demo stops after the data step"
  exit 0
fi

load_env_file configs/cpu_demo.env
mkdir -p logs
python train_gpt.py 2>&1 | tee logs/demo_stdout.txt
echo "---- demo summary ----"
grep -E '^(artifact |final_)' logs/demo_stdout.txt || echo "(the trainer printed no final lines; see logs/demo_stdout.txt)"
