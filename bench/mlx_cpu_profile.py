"""Where the MLX twin's training step goes on a CPU: wall time, cores used and GFLOP/s of its pieces, against
torch where torch has the same piece, on the proxy configuration's shapes (4 x 256, batch 32 x 256).

    python -m bench.mlx_cpu_profile
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 python -m bench.mlx_cpu_profile

The mlx[cpu] wheel for Linux links the reference BLAS (one core, unoptimised); MLX calls the first
cblas_sgemm of the process's global scope, so a preloaded optimised BLAS replaces it. A preload reaches the
torch figures of the same process too (they are then not torch's usual speed). Time it alone on the machine.
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import train_gpt  # noqa: E402
import train_gpt_mlx as twin  # noqa: E402
from skcgolf import trainrun  # noqa: E402


def timed(name: str, fn, reps: int = 3, flops: float | None = None, warm: bool = True) -> None:
    """Print the mean wall time of fn over reps calls, the cores it kept busy and, given its flops, GFLOP/s."""
    if warm:
        fn()
    wall0, cpu0 = time.perf_counter(), time.process_time()
    for _ in range(reps):
        fn()
    wall, cpu = (time.perf_counter() - wall0) / reps, (time.process_time() - cpu0) / reps
    rate = f" {flops / wall / 1e9:7.1f} GFLOP/s" if flops else ""
    print(f"{name:36s} {wall * 1000:9.1f} ms  cores {cpu / wall:4.2f}{rate}", flush=True)


def main() -> int:
    mx.set_default_device(mx.cpu)
    env = trainrun.run_env(trainrun.REPO_ROOT / "configs" / "cpu_proxy.env", {})
    args = twin.Hyperparameters(env).replace({"VOCAB_SIZE": 1024})
    rows, seq, dim, heads, kv_heads = 32, args.train_seq_len, args.model_dim, args.num_heads, args.num_kv_heads
    head_dim, tokens = dim // heads, rows * seq

    x_mx, w_mx = mx.random.normal((tokens, dim)), mx.random.normal((3 * dim, dim))
    x_pt, w_pt = torch.randn(tokens, dim), torch.randn(3 * dim, dim)
    matmul_flops = 2 * tokens * dim * 3 * dim
    timed(f"mlx matmul [{tokens},{dim}]x[{dim},{3 * dim}]", lambda: mx.eval(x_mx @ w_mx.T), 5, matmul_flops)
    timed(f"torch matmul [{tokens},{dim}]x[{dim},{3 * dim}]", lambda: x_pt @ w_pt.T, 5, matmul_flops)

    q, k, v = (mx.random.normal((rows, h, seq, head_dim)) for h in (heads, kv_heads, kv_heads))
    q_pt, k_pt, v_pt = (torch.randn(rows, h, seq, head_dim) for h in (heads, kv_heads, kv_heads))
    attention_flops = 4 * rows * heads * seq * seq * head_dim
    scale = 1.0 / math.sqrt(head_dim)
    timed("mlx sdpa causal forward", lambda: mx.eval(
        mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask="causal")), 3, attention_flops)
    timed("torch sdpa causal forward", lambda: torch.nn.functional.scaled_dot_product_attention(
        q_pt, k_pt, v_pt, is_causal=True, enable_gqa=True), 3, attention_flops)

    torch.manual_seed(args.seed)
    model = twin.to_mlx(train_gpt.GPT(args, args.vocab_size), mx.float32)
    rng = np.random.default_rng(0)
    x, y = (mx.array(rng.integers(0, args.vocab_size, (rows, seq)).astype(np.int32)) for _ in range(2))
    timed("mlx model forward + loss", lambda: mx.eval(twin.token_losses(model(x), y).mean()), 1, warm=False)
    grad_fn = nn.value_and_grad(model, lambda a, b: twin.training_loss(model(a), b, args.z_loss_weight))
    timed("mlx forward + backward (no compile)", lambda: mx.eval(grad_fn(x, y)), 1, warm=False)
    block, h = model.blocks[0], mx.random.normal((rows, seq, dim))
    timed("mlx attention forward (one block)", lambda: mx.eval(block.attn(h)), 1, warm=False)
    timed("mlx MLP forward (one block)", lambda: mx.eval(block.mlp(h)), 1, warm=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
