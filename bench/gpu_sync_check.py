"""Count host synchronisations inside training steps on a CUDA device (torch's sync debug mode).

    python -m bench.gpu_sync_check [ENV_FILE]      # default: configs/skc_competition.env, reduced to 2 layers

Builds the configuration's model (2 layers, so that it compiles quickly; VOCAB_SIZE from the env file or
1024), runs a few untimed steps on random tokens, then TRAIN_STEPS steps with
torch.cuda.set_sync_debug_mode("warn") and prints every synchronising call it reports. The training
step (train_gpt.optimizer_step) and the stop vote's post should report none; the vote's read of the
previous step's result is outside the step. Exits 1 when a sync is reported.
"""
from __future__ import annotations

import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
import train_gpt  # noqa: E402
from skcgolf import trainrun  # noqa: E402

WARM_STEPS, TRAIN_STEPS = 5, 5


def main(argv: list[str]) -> int:
    if not torch.cuda.is_available():
        print("gpu_sync_check: no CUDA device", file=sys.stderr)
        return 2
    env_file = argv[0] if argv else str(REPO_ROOT / "configs" / "skc_competition.env")
    env = {k: v for k, v in trainrun.read_env_file(env_file).items() if k in train_gpt.Hyperparameters.SETTINGS}
    env.update(NUM_LAYERS="2", TRAIN_BATCH_TOKENS="65536", TRAIN_MICRO_BATCH_TOKENS="65536")
    args = train_gpt.Hyperparameters(env)
    args.vocab_size = args.vocab_size or 1024
    rt = train_gpt.init_runtime(args)
    model = train_gpt.GPT(args, args.vocab_size).to(rt.device)
    model.set_attention_backend(*train_gpt.select_attention_backend(args.attn_backend, rt.device))
    compiled = torch.compile(model, dynamic=False) if train_gpt.use_compile(args, rt) else model
    optimizers, _ = train_gpt.build_optimizers(model, args, fused=True, compile_ns=train_gpt.use_compile(args, rt))
    with tempfile.TemporaryDirectory() as data:
        tokens = np.random.default_rng(0).integers(0, args.vocab_size, 1 << 22, dtype=np.uint16)
        train_gpt.write_shard(Path(data) / "fineweb_train_000000.bin", tokens)
        loader = train_gpt.DistributedTokenLoader(data, args.vocab_size, 0, 1, rt.device)
        accum, micro = train_gpt.grad_accum_steps(args, 1)
        vote = train_gpt.StopVote(rt)

        def step(i: int) -> None:
            loss = train_gpt.optimizer_step(compiled, model, loader, optimizers, args, rt, accum, micro, i, 0.5)
            vote.post(i + 1, False, loss)

        for i in range(WARM_STEPS):
            step(i)
            vote.take()
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            for i in range(WARM_STEPS, WARM_STEPS + TRAIN_STEPS):
                step(i)
            torch.cuda.set_sync_debug_mode("default")
        vote.take()
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message).lower()]
    print(f"gpu_sync_check: {len(syncs)} host sync(s) in {TRAIN_STEPS} training steps of {Path(env_file).name} "
          f"(2 layers, compile {'on' if compiled is not model else 'off'})")
    for message in dict.fromkeys(syncs):
        print("  " + message.splitlines()[0])
    return 1 if syncs else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
