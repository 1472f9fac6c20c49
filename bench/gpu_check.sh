#!/usr/bin/env bash
# One prepared check for a single lent GPU, under 8 minutes; installs nothing.
#   bash bench/gpu_check.sh
# Runs the competition config (configs/skc_competition.env) and then the
# baseline (configs/baseline.env) for GPU_CHECK_STEPS timed steps each on one
# GPU (torch.compile on), and prints ms/step, tokens/s, peak memory, the
# attention backend and the projected steps in 600 s on 8xH100.
# Data: DATA_PATH/TOKENIZER_PATH when they exist; otherwise synthetic uniform
# tokens with a tokenizer trained by data/prepare.py on the offline corpus
# (timing only: their val_bpb means nothing).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/env.sh

OUT=${GPU_CHECK_OUT:-bench/out/gpu_check}
STEPS=${GPU_CHECK_STEPS:-60}
RUN_TIMEOUT=${GPU_CHECK_RUN_TIMEOUT:-210}
PYTHON=${PYTHON:-python}

check_environment() {
    "$PYTHON" - <<'PY'
import sys
try:
    import numpy, sentencepiece, torch
except ImportError as error:
    sys.exit(f"gpu_check: missing Python package ({error}); install requirements.txt first")
if not torch.cuda.is_available():
    sys.exit("gpu_check: torch sees no CUDA device")
print(f"torch {torch.__version__} cuda {torch.version.cuda} on {torch.cuda.get_device_name(0)}")
PY
}

# Synthetic shards: enough train tokens for the warm-up and timed steps at the
# competition batch (524288 tokens per step), a small val split.
write_synthetic_shards() {
    local dir=$1 train_tokens=$(( (STEPS + 10) * 524288 ))
    "$PYTHON" - "$dir" "$train_tokens" <<'PY'
import sys
import numpy as np
import train_gpt
out, train_tokens = sys.argv[1], int(sys.argv[2])
rng = np.random.default_rng(0)
shard_tokens = 1 << 24
for index, start in enumerate(range(0, train_tokens, shard_tokens)):
    count = min(shard_tokens, train_tokens - start)
    train_gpt.write_shard(f"{out}/fineweb_train_{index:06d}.bin", rng.integers(0, 1024, count, dtype=np.uint16))
train_gpt.write_shard(f"{out}/fineweb_val_000000.bin", rng.integers(0, 1024, 1 << 21, dtype=np.uint16))
PY
}

# Sets DATA_PATH and TOKENIZER_PATH for the runs.
prepare_data() {
    if compgen -G "${DATA_PATH:-/nonexistent}/fineweb_train_*.bin" >/dev/null && [[ -f ${TOKENIZER_PATH:-} ]]; then
        echo "data: $DATA_PATH (tokenizer $TOKENIZER_PATH)"
        return
    fi
    local dir=$OUT/synthetic_data
    if [[ ! -f $dir/tokenizer.model ]]; then
        mkdir -p "$OUT"
        if ! "$PYTHON" data/prepare.py build --spec sp_bpe_1024 --out "$dir" --val-docs 20 --max-docs 400 \
                >"$OUT/prepare.log" 2>&1; then
            echo "gpu_check: training the tokenizer failed; last lines of $OUT/prepare.log:"
            tail -n 15 "$OUT/prepare.log"
            exit 1
        fi
        rm -f "$dir"/fineweb_*.bin "$dir"/manifest.json  # keep only the tokenizer
        write_synthetic_shards "$dir"
    fi
    export DATA_PATH=$dir TOKENIZER_PATH=$dir/tokenizer.model
    echo "data: synthetic tokens in $dir (timing only)"
}

# run_check NAME ENV_FILE: fixed-step run of one config; the log goes to $OUT/logs/NAME.log.
run_check() {
    local name=$1 env_file=$2 log=$OUT/logs/$1.log status=0
    mkdir -p "$OUT/logs"
    echo "run: $name ($env_file, $STEPS steps)"
    (
        export ITERATIONS=$STEPS MAX_WALLCLOCK_SECONDS=0 WARMUP_STEPS=5 VAL_LOSS_EVERY=0 \
               VAL_MAX_TOKENS=1048576 TRAIN_LOG_EVERY=10 RUN_ID=gpu_check_$name LOG_DIR=$OUT/logs
        load_env_file "$env_file"
        timeout "$RUN_TIMEOUT" "$PYTHON" train_gpt.py
    ) >"$log" 2>&1 || status=$?
    if (( status != 0 )); then
        echo "  $name failed (exit $status); last lines of $log:"
        tail -n 15 "$log" | sed 's/^/    /'
    fi
}

main() {
    local start=$SECONDS
    check_environment
    prepare_data
    run_check competition configs/skc_competition.env
    run_check baseline configs/baseline.env
    "$PYTHON" -m bench.gpu_report competition="$OUT/logs/competition.log" baseline="$OUT/logs/baseline.log"
    echo "gpu_check took $(( SECONDS - start )) s"
}

main "$@"
