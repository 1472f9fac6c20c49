#!/usr/bin/env bash
# One prepared check for a single lent GPU, under 10 minutes; installs nothing.
#   bash bench/gpu_check.sh
# Records, on the same GPU in one go, the ms/step of the competition config
# (configs/skc_competition.env, sp8192, torch.compile on) and of the official
# baseline's config (configs/baseline.env, sp1024) for GPU_CHECK_STEPS timed
# steps each, with tokens/s, peak memory, the attention backend and the
# projected steps in 600 s on 8xH100; then counts host syncs inside training
# steps with torch's sync debug mode (bench/gpu_sync_check.py).
# Data: each config's own DATA_PATH/TOKENIZER_PATH when they exist; otherwise
# synthetic uniform tokens with a tokenizer of the config's vocabulary trained
# by data/prepare.py on the offline corpus (timing only: val_bpb means nothing).
# The summary goes to $OUT/summary.txt (default bench/out/gpu_check/).
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

# Synthetic shards for a tokenizer of $3 pieces: enough train tokens for the warm-up and
# timed steps at the competition batch (524288 tokens per step), a small val split.
write_synthetic_shards() {
    local dir=$1 train_tokens=$(( (STEPS + 10) * 524288 )) vocab=$2
    "$PYTHON" - "$dir" "$train_tokens" "$vocab" <<'PY'
import sys
import numpy as np
import train_gpt
out, train_tokens, vocab = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = np.random.default_rng(0)
shard_tokens = 1 << 24
for index, start in enumerate(range(0, train_tokens, shard_tokens)):
    count = min(shard_tokens, train_tokens - start)
    train_gpt.write_shard(f"{out}/fineweb_train_{index:06d}.bin", rng.integers(0, vocab, count, dtype=np.uint16))
train_gpt.write_shard(f"{out}/fineweb_val_000000.bin", rng.integers(0, vocab, 1 << 21, dtype=np.uint16))
PY
}

# use_synthetic_data VOCAB: sets DATA_PATH, TOKENIZER_PATH and VOCAB_SIZE to synthetic shards with a
# tokenizer trained for VOCAB pieces (the offline corpus may give a few less; VOCAB_SIZE follows it).
use_synthetic_data() {
    local vocab=$1 dir=$OUT/synthetic_sp$1 pieces
    if [[ ! -f $dir/tokenizer.model ]]; then
        mkdir -p "$OUT"
        if ! "$PYTHON" data/prepare.py build --spec "sp_bpe_$vocab" --out "$dir" --val-docs 20 --max-docs 400 \
                >"$OUT/prepare_sp$vocab.log" 2>&1; then
            echo "gpu_check: training the $vocab-piece tokenizer failed; last lines of $OUT/prepare_sp$vocab.log:"
            tail -n 15 "$OUT/prepare_sp$vocab.log"
            exit 1
        fi
        rm -f "$dir"/fineweb_*.bin "$dir"/manifest.json  # keep only the tokenizer
        pieces=$("$PYTHON" -c "import sentencepiece as s; print(s.SentencePieceProcessor(model_file='$dir/tokenizer.model').vocab_size())")
        write_synthetic_shards "$dir" "$pieces"
    fi
    pieces=$("$PYTHON" -c "import sentencepiece as s; print(s.SentencePieceProcessor(model_file='$dir/tokenizer.model').vocab_size())")
    export DATA_PATH=$dir TOKENIZER_PATH=$dir/tokenizer.model VOCAB_SIZE=$pieces
    echo "  data: synthetic tokens in $dir, vocab $pieces (timing only)"
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
        if ! compgen -G "$DATA_PATH/fineweb_train_*.bin" >/dev/null || [[ ! -f $TOKENIZER_PATH ]]; then
            use_synthetic_data "$VOCAB_SIZE"
        fi
        timeout "$RUN_TIMEOUT" "$PYTHON" train_gpt.py >"$log" 2>&1
    ) || status=$?
    if (( status != 0 )); then
        echo "  $name failed (exit $status); last lines of $log:"
        tail -n 15 "$log" | sed 's/^/    /'
    fi
}

main() {
    local start=$SECONDS
    check_environment
    run_check competition configs/skc_competition.env
    run_check baseline configs/baseline.env
    {
        "$PYTHON" -m bench.gpu_report competition="$OUT/logs/competition.log" baseline="$OUT/logs/baseline.log"
        timeout "$RUN_TIMEOUT" "$PYTHON" -m bench.gpu_sync_check configs/skc_competition.env || true
    } | tee "$OUT/summary.txt"
    echo "gpu_check took $(( SECONDS - start )) s; summary in $OUT/summary.txt"
}

main "$@"
