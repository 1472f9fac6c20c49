"""skc-golf trainer for Apple Silicon: the MLX twin of train_gpt.py.

It trains the same ternary U-Net GPT from the same settings, data and seed, reports the same val_bpb
in the same log lines, and writes artifacts in the same format (train_gpt.py loads them, and this file
loads train_gpt.py's). Read top to bottom in the order data flows:
hyperparameters -> data -> quantization primitives -> model -> torch conversion -> optimizers ->
training loop -> export -> evaluation -> main.

Mac:  python train_gpt_mlx.py          (or ./run_mlx_mac.sh for small-model defaults)
Configuration comes from the same environment variables as train_gpt.py, plus MLX_COMPUTE_DTYPE.

What is shared with train_gpt.py, by import rather than by copy: the settings table and its
validation, the shard reader, the SentencePiece byte tables and the val_bpb bookkeeping, the official
log lines, the initial weights (built by train_gpt.GPT from SEED), the artifact container, ternary
calibration and the EvalEngram counts. That pulls in torch, which runs on the CPU at start-up, in
calibration, at export and in the score's bookkeeping, never in a training step: every training
forward, backward and optimizer update, and every evaluation forward, is MLX.
"""
from __future__ import annotations

import math
import os
import platform
import signal
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import torch
from mlx.utils import tree_flatten, tree_unflatten

import train_gpt
from train_gpt import ArtifactError, ConfigError, Logger, Runtime, Setting, StreamContext

# -----------------------------------------------------------------------------
# Hyperparameters
# -----------------------------------------------------------------------------
# train_gpt.py's settings with their names, defaults and checks, plus the twin's own MLX_ settings.
MLX_PREFIX = "MLX_"
COMPUTE_DTYPES = {"bfloat16": mx.bfloat16, "float32": mx.float32}


class Hyperparameters(train_gpt.Hyperparameters):
    SETTINGS = {
        **train_gpt.Hyperparameters.SETTINGS,
        # auto: bfloat16 on the Metal GPU, float32 on a CPU (bfloat16 matmuls there are an order of magnitude slower)
        "MLX_COMPUTE_DTYPE": Setting("auto", choices=("auto", *COMPUTE_DTYPES)),
    }

    @classmethod
    def _reject_unknown(cls, env) -> None:
        super()._reject_unknown(env)
        for name in sorted(env):
            if name.startswith(MLX_PREFIX) and name not in cls.SETTINGS:
                raise ConfigError(f"unknown setting {name} (the {MLX_PREFIX} prefix is reserved for the MLX twin); "
                                  f"its settings are {', '.join(n for n in cls.SETTINGS if n.startswith(MLX_PREFIX))}")


# What the twin does with each train_gpt.py setting. Supported ones mean what they mean there (on one
# device, so DIST_*TIMEOUT_SECONDS have no collective to time out; ternary calibration and the EvalEngram
# counts run through train_gpt.py's own code on the CPU). An unsupported one stops the run when
# it asks for what the twin lacks; a setting in neither list (one added to train_gpt.py after the twin)
# stops the run whenever it is not at its default, so nothing is ever silently ignored.
SUPPORTED_SETTINGS = frozenset((
    "DATA_PATH", "TOKENIZER_PATH", "VOCAB_SIZE", "RUN_ID", "SEED", "LOG_DIR", "ARTIFACT_DIR", "DRY_RUN",
    "DIST_TIMEOUT_SECONDS", "DIST_STEP_TIMEOUT_SECONDS", "RUN_OVERWRITE", "ITERATIONS", "WARMUP_STEPS", "LR_WARMUP_STEPS", "WARMDOWN_FRACTION", "WARMDOWN_ITERS",
    "TRAIN_BATCH_TOKENS",
    "TRAIN_MICRO_BATCH_TOKENS", "TRAIN_SEQ_LEN", "MAX_WALLCLOCK_SECONDS", "VAL_LOSS_EVERY", "VAL_BATCH_SIZE",
    "VAL_MAX_TOKENS", "TRAIN_LOG_EVERY", "GRAD_CLIP_NORM", "EMA_DECAY", "EMA_START_FRAC", "MODEL_COMPILE",
    "NUM_LAYERS", "MODEL_DIM", "NUM_HEADS", "NUM_KV_HEADS", "MLP_MULT", "MLP_ACT", "EMBED_DIM", "TIE_EMBEDDINGS",
    "TIED_EMBED_INIT_STD", "ROPE_BASE", "ROPE_DIMS", "QK_NORM", "QK_GAIN_INIT", "LOGIT_SOFTCAP", "SOFTCAP_TYPE",
    "Z_LOSS_WEIGHT", "WEIGHT_QUANT", "TERNARY_GROUP_SIZE", "TERNARY_SCALE_FORMAT", "FP_STORAGE_SIM",
    "TURBO_QUANT_TRAIN", "EMBED_LR", "HEAD_LR", "TIED_EMBED_LR", "MATRIX_LR", "SCALAR_LR", "MUON_MOMENTUM",
    "MUON_BACKEND_STEPS", "MUON_MOMENTUM_WARMUP_START", "MUON_MOMENTUM_WARMUP_STEPS", "MUON_WEIGHT_DECAY",
    "MUON_ROW_NORM", "EMBED_WEIGHT_DECAY", "BETA1", "BETA2", "ADAM_EPS", "EXPORT_FORMAT", "EXPORT_FP_FORMAT",
    "EXPORT_FP16_PATTERNS", "EXPORT_CLIP_SEARCH", "EXPORT_CODEC", "TURBO_QUANT_EXPORT", "SIZE_CAP_BYTES",
    "SIZE_MARGIN_BYTES", "SUBMISSION_MODE", "CALIB_MAX_EVALS", "CALIB_MAX_SECONDS", "CALIB_TOKENS", "CALIB_MIN_PARAMS",
    "EVAL_ARTIFACT", "EVAL_SEQ_LEN", "SLIDING_EVAL_STRIDE", "EVAL_CHUNK_TOKENS", "EVAL_MAX_SECONDS",
    "EVAL_DUMP_TOKEN_LOSSES", "EVAL_TEMPERATURE_FIT", "EVAL_ENGRAM", "EVAL_ENGRAM_ORDER", "EVAL_ENGRAM_BUCKETS",
    "EVAL_ENGRAM_ALPHA", "EVAL_ENGRAM_WEIGHT", "EVAL_ENGRAM_CENTER", "EVAL_ENGRAM_BACKOFF", "EVAL_ENGRAM_MIX",
    "TTT_ENABLED", "TTT_SCOPE", "TTT_LR", "TTT_MOMENTUM", "TTT_EPOCHS", "TTT_GRAD_CLIP", "MLX_COMPUTE_DTYPE"))
# name -> (does this configuration ask for what the twin lacks?, what to do instead)
UNSUPPORTED_SETTINGS = {
    "ATTN_BACKEND": (lambda a: a.attn_backend in ("fa3", "fa2"),
                     "flash-attention kernels are CUDA-only; the twin uses MLX's fused attention: set ATTN_BACKEND=auto"),
}


def check_twin_support(args: Hyperparameters) -> None:
    """Stop, naming the setting, when the configuration asks for something the twin does not implement."""
    for name, setting in args.SETTINGS.items():
        if name in UNSUPPORTED_SETTINGS:
            asks_for_it, advice = UNSUPPORTED_SETTINGS[name]
            if asks_for_it(args):
                raise ConfigError(f"{name}={getattr(args, name.lower())} is not supported by train_gpt_mlx.py: {advice}")
        elif name not in SUPPORTED_SETTINGS and getattr(args, name.lower()) != setting.default:
            raise ConfigError(f"{name}={getattr(args, name.lower())} is not implemented in train_gpt_mlx.py (the twin "
                              f"runs only at its default, {setting.default!r}): unset it, or train with train_gpt.py")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size != 1:
        raise ConfigError(f"WORLD_SIZE={world_size}: the MLX twin runs on one device; use torchrun with train_gpt.py")


def compute_dtype(args: Hyperparameters) -> tuple[mx.Dtype, str]:
    """(dtype, why): MLX_COMPUTE_DTYPE, or bfloat16 where the default device is the Metal GPU, float32 on a CPU."""
    if args.mlx_compute_dtype != "auto":
        return COMPUTE_DTYPES[args.mlx_compute_dtype], "MLX_COMPUTE_DTYPE"
    on_gpu = mx.default_device().type == mx.DeviceType.gpu
    return (mx.bfloat16, "auto: Metal GPU") if on_gpu else (mx.float32, "auto: CPU device, no fast bfloat16")


# -----------------------------------------------------------------------------
# Data: train_gpt.py's shard reader and token stream, cut as on rank 0 of 1
# -----------------------------------------------------------------------------
class TokenLoader:
    """The training batches train_gpt.DistributedTokenLoader gives a single process: the same spans, as MLX arrays."""

    def __init__(self, data_path: str, vocab_size: int):
        self.stream = train_gpt.TokenStream(train_gpt.shard_files(data_path, "train"), vocab_size)

    def next_batch(self, tokens: int, seq_len: int) -> tuple[mx.array, mx.array]:
        chunk = self.stream.take(tokens + 1).astype(np.int32)
        return mx.array(chunk[:-1].reshape(-1, seq_len)), mx.array(chunk[1:].reshape(-1, seq_len))


# -----------------------------------------------------------------------------
# Quantization primitives (train_gpt.py's, in MLX; the parity tests hold them equal)
# -----------------------------------------------------------------------------
FP8_MAX = train_gpt.FP8_MAX
FP4_GRID = mx.array(train_gpt.FP4_GRID)


def fp8_round_trip(x: mx.array, scale: mx.array) -> mx.array:
    """x stored as float8 e4m3fn codes of x/scale (saturating), read back."""
    return mx.from_fp8(mx.to_fp8(mx.clip(x / scale, -FP8_MAX, FP8_MAX)), mx.float32) * scale


def fp4_round_trip(x: mx.array, scale: mx.array) -> mx.array:
    """x stored as float4 e2m1 codes (nearest magnitude of FP4_GRID, sign bit), read back."""
    magnitude = mx.minimum(mx.abs(x / scale), FP4_GRID[-1])
    index = mx.argmin(mx.abs(magnitude[..., None] - FP4_GRID), axis=-1)
    return mx.where(x < 0, -1.0, 1.0) * FP4_GRID[index] * scale


def fp_row_scale(w: mx.array, fmt: str) -> mx.array:
    """Per-row scale as stored (fp16, never zero) that maps the row's absolute maximum onto the format's largest value."""
    top = FP8_MAX if fmt == "fp8" else train_gpt.FP4_GRID[-1]
    amax = mx.max(mx.abs(w), axis=-1, keepdims=True).astype(mx.float32)
    return mx.maximum((amax / top).astype(mx.float16).astype(mx.float32), train_gpt.FP16_TINIEST)


def straight_through(w: mx.array, q: mx.array) -> mx.array:
    """Exactly q in the forward (w - stop_gradient(w) is exactly 0), with w's gradient passed through unchanged."""
    return q.astype(w.dtype) + (w - mx.stop_gradient(w))


def fp_fake_quant(w: mx.array, fmt: str) -> mx.array:
    """Round-trip w through fp8/fp4 storage, exactly as export stores it; the gradient passes straight through."""
    frozen = mx.stop_gradient(w)
    scale = fp_row_scale(frozen, fmt)
    return straight_through(w, fp8_round_trip(frozen, scale) if fmt == "fp8" else fp4_round_trip(frozen, scale))


def round_scale(scale: mx.array, fmt: str) -> mx.array:
    """Per-group ternary scales as they will be stored: fp16, or fp8 times a power-of-two per-tensor factor."""
    if fmt == "fp16":
        return mx.clip(scale, 6.2e-5, 65504.0).astype(mx.float16).astype(mx.float32)
    factor = mx.power(2.0, mx.ceil(mx.log2(mx.maximum(mx.max(scale), 1e-30) / FP8_MAX)))
    return mx.maximum(fp8_round_trip(scale, factor), 2.0 ** -9 * factor)


def ternary_quantize(w: mx.array, group_size: int, scale_format: str, threshold: float, scale_mult: float,
                     fixed_scales: mx.array | None) -> tuple[mx.array, mx.array]:
    """BitNet b1.58 trits (as floats) and per-group scales, exactly as train_gpt.ternary_quantize."""
    groups = mx.stop_gradient(w).astype(mx.float32).reshape(w.shape[0], -1, group_size)
    if fixed_scales is None:
        reference = mx.maximum(mx.mean(mx.abs(groups), axis=-1), 1e-8)
        scales = round_scale(reference * scale_mult, scale_format)
    else:
        reference = scales = fixed_scales
    ratio = groups / reference[..., None]
    trits = mx.where(mx.abs(ratio) > threshold, mx.sign(ratio), 0.0)
    return trits.reshape(w.shape), scales


def hadamard_matrix(n: int) -> mx.array:
    return mx.array(train_gpt.hadamard_matrix(n).numpy())


def rotate_blocks(x: mx.array, hadamard: mx.array) -> mx.array:
    n = hadamard.shape[0]
    return (x.reshape(*x.shape[:-1], -1, n) @ hadamard.astype(x.dtype)).reshape(x.shape)


# -----------------------------------------------------------------------------
# Model: the same ternary U-Net GPT, parameter for parameter
# -----------------------------------------------------------------------------
# Parameter names equal train_gpt.GPT's state_dict names, so weights convert by name. Each module declares
# its parameters' roles as train_gpt.py's modules do. What torch keeps in buffers (exact stored scales,
# the Hadamard rotation, the logit temperature) lives in attributes whose names start with "_", which
# MLX never counts as parameters.
class TernaryLinear(nn.Module):
    """BitNet b1.58 linear layer trained through an fp shadow weight (straight-through estimator)."""
    param_roles = {"weight": "matrix"}

    def __init__(self, in_features: int, out_features: int, group_size: int, scale_format: str, rotate: bool):
        super().__init__()
        self.weight = mx.zeros((out_features, in_features))
        self.group_size, self.scale_format = group_size, scale_format
        self.threshold, self.scale_mult = 0.5, 1.0
        self._fixed_scales = None
        self._hadamard = hadamard_matrix(group_size) if rotate else None

    def __call__(self, x: mx.array) -> mx.array:
        trits, scales = ternary_quantize(self.weight, self.group_size, self.scale_format, self.threshold,
                                         self.scale_mult, self._fixed_scales)
        q = (trits.reshape(trits.shape[0], -1, self.group_size) * scales[..., None]).reshape(trits.shape)
        w = straight_through(self.weight, q)
        if self._hadamard is not None:
            x = rotate_blocks(x, self._hadamard)
        return x @ w.astype(x.dtype).T


class CastedLinear(nn.Module):
    """Full-precision linear layer kept in fp32 and cast to the activation dtype."""
    param_roles = {"weight": "matrix"}

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = mx.zeros((out_features, in_features))
        self.storage_format: str | None = None  # fp8/fp4: the forward uses the weight as export stores it

    def __call__(self, x: mx.array) -> mx.array:
        w = self.weight if self.storage_format is None else fp_fake_quant(self.weight, self.storage_format)
        return x @ w.astype(x.dtype).T


class LMHead(CastedLinear):
    param_roles = {"weight": "head"}


class TokenEmbedding(nn.Module):
    param_roles = {"weight": "embed"}

    def __init__(self, vocab_size: int, dim: int):
        super().__init__()
        self.weight = mx.zeros((vocab_size, dim))


def make_linear(args: Hyperparameters, in_features: int, out_features: int) -> nn.Module:
    if args.weight_quant == "ternary":
        return TernaryLinear(in_features, out_features, args.ternary_group_size, args.ternary_scale_format,
                             args.turbo_quant_train)
    return CastedLinear(in_features, out_features)


RMS_NORM_EPS = float(np.finfo(np.float32).eps)  # F.rms_norm's default for train_gpt.py's float32 activations


def rms_norm(x: mx.array) -> mx.array:
    return mx.fast.rms_norm(x, None, RMS_NORM_EPS)


class Rotary(nn.Module):
    """RoPE on the first `rope_dims` dims of each head (partial RoPE); the rest carry no position."""

    def __init__(self, rope_dims: int, base: float):
        super().__init__()
        self.rope_dims = rope_dims
        self._inv_freq = 1.0 / mx.power(mx.array(base, mx.float32), mx.arange(0, rope_dims, 2).astype(mx.float32) / rope_dims)

    def __call__(self, x: mx.array) -> mx.array:  # x: [B, T, H, D]
        # recomputed every call (no cache): arrays kept from inside an mx.compile trace must not leak out of it
        freqs = mx.arange(x.shape[1]).astype(mx.float32)[:, None] * self._inv_freq[None, :]
        cos, sin = mx.cos(freqs)[None, :, None, :].astype(x.dtype), mx.sin(freqs)[None, :, None, :].astype(x.dtype)
        half = self.rope_dims // 2
        x1, x2, rest = x[..., :half], x[..., half:self.rope_dims], x[..., self.rope_dims:]
        return mx.concatenate((x1 * cos + x2 * sin, x2 * cos - x1 * sin, rest), axis=-1)


class CausalSelfAttention(nn.Module):
    param_roles = {"q_gain": "scalar"}

    def __init__(self, args: Hyperparameters):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = args.num_heads, args.num_kv_heads, args.head_dim
        kv_dim = self.num_kv_heads * self.head_dim
        self.c_q = make_linear(args, args.model_dim, args.model_dim)
        self.c_k = make_linear(args, args.model_dim, kv_dim)
        self.c_v = make_linear(args, args.model_dim, kv_dim)
        self.proj = make_linear(args, args.model_dim, args.model_dim)
        self.qk_norm = args.qk_norm
        self.q_gain = mx.full((self.num_heads,), args.qk_gain_init)
        self.rotary = Rotary(args.rope_dims or self.head_dim, args.rope_base)

    def __call__(self, x: mx.array) -> mx.array:
        B, T, _ = x.shape
        q = self.c_q(x).reshape(B, T, self.num_heads, self.head_dim)
        k = self.c_k(x).reshape(B, T, self.num_kv_heads, self.head_dim)
        v = self.c_v(x).reshape(B, T, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = rms_norm(q), rms_norm(k)
        q = self.rotary(q) * self.q_gain.astype(q.dtype)[None, None, :, None]
        k = self.rotary(k)
        y = mx.fast.scaled_dot_product_attention(q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3),
                                                 v.transpose(0, 2, 1, 3), scale=1.0 / math.sqrt(self.head_dim),
                                                 mask="causal")
        return self.proj(y.transpose(0, 2, 1, 3).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, args: Hyperparameters):
        super().__init__()
        self.fc = make_linear(args, args.model_dim, args.mlp_hidden)
        self.proj = make_linear(args, args.mlp_hidden, args.model_dim)
        self.negative_slope = 0.5 if args.mlp_act == "leaky_relu2" else 0.0

    def __call__(self, x: mx.array) -> mx.array:
        h = self.fc(x)
        h = mx.where(h >= 0, h, self.negative_slope * h) if self.negative_slope else mx.maximum(h, 0)
        return self.proj(h * h)


class Block(nn.Module):
    """Pre-norm block; resid_mix blends the running stream with the input embedding x0."""
    param_roles = {"attn_scale": "scalar", "mlp_scale": "scalar", "resid_mix": "scalar"}

    def __init__(self, args: Hyperparameters):
        super().__init__()
        self.attn = CausalSelfAttention(args)
        self.mlp = MLP(args)
        self.attn_scale = mx.ones((args.model_dim,))
        self.mlp_scale = mx.ones((args.model_dim,))
        self.resid_mix = mx.stack((mx.ones((args.model_dim,)), mx.zeros((args.model_dim,))))

    def __call__(self, x: mx.array, x0: mx.array) -> mx.array:
        mix = self.resid_mix.astype(x.dtype)
        x = mix[0] * x + mix[1] * x0
        x = x + self.attn_scale.astype(x.dtype) * self.attn(rms_norm(x))
        return x + self.mlp_scale.astype(x.dtype) * self.mlp(rms_norm(x))


def softcap(logits: mx.array, cap: float, kind: str) -> mx.array:
    if cap <= 0:
        return logits
    if kind == "tanh":
        return cap * mx.tanh(logits / cap)
    z = mx.clip(logits / cap, -1.5, 1.5)
    return cap * (z - (4.0 / 27.0) * z * z * z)


class GPT(nn.Module):
    """U-Net GPT: the first half of the blocks push skips that the second half pops, in reverse, with learned weights.
    Built with placeholder values: the weights, and which matrices compute through their fp8/fp4 storage format
    (train_gpt.GPT.simulate_storage), come from train_gpt.GPT (to_mlx), so both twins start alike."""
    param_roles = {"skip_weights": "scalar"}

    def __init__(self, args: Hyperparameters, vocab_size: int, dtype: mx.Dtype = mx.float32):
        super().__init__()
        self.args, self.vocab_size, self.dtype = args, vocab_size, dtype
        embed_dim = args.embed_dim or args.model_dim
        self.tok_emb = TokenEmbedding(vocab_size, embed_dim)
        factored = embed_dim != args.model_dim
        self.embed_proj = CastedLinear(embed_dim, args.model_dim) if factored else None
        self.head_proj = CastedLinear(args.model_dim, embed_dim) if factored else None
        self.lm_head = None if args.tie_embeddings else LMHead(args.model_dim, vocab_size)
        self.num_encoder_layers = args.num_layers // 2
        self.num_decoder_layers = args.num_layers - self.num_encoder_layers
        self.skip_weights = mx.ones((min(self.num_encoder_layers, self.num_decoder_layers), args.model_dim))
        self.blocks = [Block(args) for _ in range(args.num_layers)]
        self._logit_temperature = mx.array(1.0) if args.eval_temperature_fit else None
        self.embed_format: str | None = None

    def embedding_weight(self) -> mx.array:
        w = self.tok_emb.weight
        return w if self.embed_format is None else fp_fake_quant(w, self.embed_format)

    def hidden_states(self, input_ids: mx.array) -> mx.array:
        x = self.embedding_weight()[input_ids].astype(self.dtype)
        if self.embed_proj is not None:
            x = self.embed_proj(x)
        x = x0 = rms_norm(x)
        skips = []
        for i, block in enumerate(self.blocks):
            if i >= self.num_encoder_layers and skips:
                x = x + self.skip_weights[i - self.num_encoder_layers].astype(x.dtype) * skips.pop()
            x = block(x, x0)
            if i < self.num_encoder_layers:
                skips.append(x)
        return rms_norm(x)

    def logits(self, hidden: mx.array) -> mx.array:
        if self.lm_head is not None:
            raw = self.lm_head(hidden)
        else:
            if self.head_proj is not None:
                hidden = self.head_proj(hidden)
            raw = hidden @ self.embedding_weight().astype(hidden.dtype).T
        capped = softcap(raw.astype(mx.float32), self.args.logit_softcap, self.args.softcap_type)
        return capped if self._logit_temperature is None else capped / self._logit_temperature

    def __call__(self, input_ids: mx.array) -> mx.array:
        """Logits [B, T, vocab] in fp32, after the softcap."""
        return self.logits(self.hidden_states(input_ids))


def token_losses(logits: mx.array, target_ids: mx.array) -> mx.array:
    """Pure cross-entropy per target token, in nats."""
    return mx.logsumexp(logits, axis=-1) - mx.take_along_axis(logits, target_ids[..., None], axis=-1)[..., 0]


def training_loss(logits: mx.array, target_ids: mx.array, z_loss_weight: float) -> tuple[mx.array, mx.array]:
    """(objective, cross-entropy): the objective adds the z-loss; the reported loss never does."""
    ce = token_losses(logits, target_ids).mean()
    if z_loss_weight <= 0:
        return ce, ce
    return ce + z_loss_weight * mx.square(mx.logsumexp(logits, axis=-1)).mean(), ce


def parameter_roles(model: GPT) -> dict[str, str]:
    """Every trainable parameter's role, declared by the module that owns it (as train_gpt.parameter_roles)."""
    owners = dict(model.named_modules())
    roles = {}
    for name, _ in tree_flatten(model.trainable_parameters()):
        prefix, _, local = name.rpartition(".")
        role = getattr(owners[prefix], "param_roles", {}).get(local)
        if role not in train_gpt.ROLES:
            raise TypeError(f"parameter {name} has no role: declare it in {type(owners[prefix]).__name__}.param_roles "
                            f"as one of {', '.join(train_gpt.ROLES)}")
        roles[name] = role
    return roles


def ternary_layers(model: GPT) -> dict[str, TernaryLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, TernaryLinear)}


def copy_storage_formats(source, model: GPT) -> None:
    """Which matrices of `model` compute through their storage format: as in `source` (either twin's GPT)."""
    casted = (CastedLinear, train_gpt.CastedLinear)
    formats = {name: m.storage_format for name, m in source.named_modules() if isinstance(m, casted)}
    for name, m in model.named_modules():
        if isinstance(m, CastedLinear):
            m.storage_format = formats[name]
    model.embed_format = source.embed_format


# -----------------------------------------------------------------------------
# Conversion to and from train_gpt.GPT (initial weights, export, artifacts, parity tests)
# -----------------------------------------------------------------------------
def to_mlx(torch_model: train_gpt.GPT, dtype: mx.Dtype = mx.float32) -> GPT:
    """The MLX twin of a train_gpt.GPT: same parameters by name, same stored scales, threshold and temperature."""
    model = GPT(torch_model.args, torch_model.tok_emb.num_embeddings, dtype)
    theirs = {name: p.detach().float().cpu().numpy() for name, p in torch_model.named_parameters()}
    ours = {name for name, _ in tree_flatten(model.parameters())}
    if set(theirs) != ours:
        raise ArtifactError(f"the MLX twin does not build these parameters of the torch model: {sorted(set(theirs) - ours)[:5]}"
                            f" (and lacks none but {sorted(ours - set(theirs))[:5]}); evaluate it with train_gpt.py")
    model.update(tree_unflatten([(name, mx.array(value)) for name, value in theirs.items()]))
    twins = ternary_layers(model)
    for name, layer in torch_model.named_modules():
        if isinstance(layer, train_gpt.TernaryLinear):
            twin = twins[name]
            twin.threshold, twin.scale_mult = float(layer.threshold), float(layer.scale_mult)
            twin._fixed_scales = None if layer.fixed_scales is None else mx.array(layer.fixed_scales.float().numpy())
    if torch_model.logit_temperature is not None:
        model._logit_temperature = mx.array(float(torch_model.logit_temperature))
    copy_storage_formats(torch_model, model)
    model.export_name = getattr(torch_model, "export_name", "artifact")
    mx.eval(model.parameters())
    return model


def clone_model(model: GPT) -> GPT:
    """A model that starts with this one's weights and buffers and can then change on its own (arrays are immutable)."""
    clone = GPT(model.args, model.vocab_size, model.dtype)
    clone.update(model.parameters())
    twins = ternary_layers(clone)
    for name, layer in ternary_layers(model).items():
        twins[name].threshold, twins[name].scale_mult = layer.threshold, layer.scale_mult
        twins[name]._fixed_scales = layer._fixed_scales
    clone._logit_temperature = model._logit_temperature
    copy_storage_formats(model, clone)
    return clone


def to_torch(model: GPT) -> train_gpt.GPT:
    """The train_gpt.GPT holding this model's weights (what the exporter encodes)."""
    torch_model = train_gpt.GPT(model.args, model.vocab_size)
    state = {name: torch.from_numpy(np.array(p.astype(mx.float32))) for name, p in tree_flatten(model.parameters())}
    if model._logit_temperature is not None:
        state["logit_temperature"] = torch.tensor(float(model._logit_temperature))
    torch_model.load_state_dict(state)
    twins = ternary_layers(model)
    for name, layer in torch_model.named_modules():
        if isinstance(layer, train_gpt.TernaryLinear):
            twin = twins[name]
            layer.threshold.fill_(twin.threshold)
            layer.scale_mult.fill_(twin.scale_mult)
            if twin._fixed_scales is not None:
                layer.fixed_scales = torch.from_numpy(np.array(twin._fixed_scales))
    return torch_model


# -----------------------------------------------------------------------------
# Optimizers: train_gpt.py's updates (torch AdamW, Muon with Newton-Schulz), over flat name -> array dicts
# -----------------------------------------------------------------------------
def zeropower_via_newtonschulz5(G: mx.array, steps: int, row_norm: bool, dtype: mx.Dtype) -> mx.array:
    """Approximately orthogonalize G (quintic Newton-Schulz). A zero G gives zero, never NaN."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.astype(dtype)
    if row_norm:  # MuonEq-R: equalize row norms before orthogonalizing
        X = X / mx.maximum(mx.sqrt(mx.sum(X * X, axis=1, keepdims=True)), 1e-7)
    X = X / (mx.sqrt(mx.sum(X * X)) + 1e-7)
    transposed = G.shape[0] > G.shape[1]
    if transposed:
        X = X.T
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return (X.T if transposed else X).astype(G.dtype)


class Muon:
    """Nesterov momentum, then Newton-Schulz orthogonalized updates scaled by max(1, rows/cols)^0.5."""

    def __init__(self, names: list[str], lr: float, momentum: float, backend_steps: int, weight_decay: float,
                 row_norm: bool, dtype: mx.Dtype):
        self.names, self.lr, self.base_lr, self.momentum = names, lr, lr, momentum
        self.backend_steps, self.weight_decay, self.row_norm, self.dtype = backend_steps, weight_decay, row_norm, dtype
        self.state: dict[str, mx.array] = {}

    def update(self, params: dict[str, mx.array], grads: dict[str, mx.array]) -> None:
        for name in self.names:
            p, g = params[name], grads[name]
            buf = self.state.get(name, mx.zeros_like(g)) * self.momentum + g
            self.state[name] = buf
            g = zeropower_via_newtonschulz5(g + self.momentum * buf, self.backend_steps, self.row_norm, self.dtype)
            g = g * max(1.0, g.shape[0] / g.shape[1]) ** 0.5
            if self.weight_decay:
                p = p * (1.0 - self.lr * self.weight_decay)
            params[name] = p - self.lr * g.astype(p.dtype)


class AdamW:
    """torch.optim.AdamW (decoupled weight decay, bias-corrected moments) over groups of parameter names."""

    def __init__(self, groups: list[dict], betas: tuple[float, float], eps: float):
        self.groups, self.betas, self.eps = groups, betas, eps
        self.step_count = 0
        self.state: dict[str, tuple[mx.array, mx.array]] = {}

    def update(self, params: dict[str, mx.array], grads: dict[str, mx.array]) -> None:
        self.step_count += 1
        beta1, beta2 = self.betas
        bias1, bias2_sqrt = 1.0 - beta1 ** self.step_count, (1.0 - beta2 ** self.step_count) ** 0.5
        for group in self.groups:
            for name in group["names"]:
                p, g = params[name], grads[name]
                m, v = self.state.get(name, (mx.zeros_like(g), mx.zeros_like(g)))
                m = m + (g - m) * (1.0 - beta1)
                v = v * beta2 + (1.0 - beta2) * g * g
                self.state[name] = (m, v)
                if group["weight_decay"]:
                    p = p * (1.0 - group["lr"] * group["weight_decay"])
                params[name] = p - (group["lr"] / bias1) * m / (mx.sqrt(v) / bias2_sqrt + self.eps)


class Optimizers:
    """One optimizer group per parameter role, as train_gpt.build_optimizers: Muon for matrices, Adam for the rest."""

    def __init__(self, model: GPT, args: Hyperparameters, dtype: mx.Dtype):
        self.groups: dict[str, list[str]] = {role: [] for role in train_gpt.ROLES}
        for name, role in parameter_roles(model).items():
            self.groups[role].append(name)
        embed_lr = args.tied_embed_lr if args.tie_embeddings else args.embed_lr
        adam_groups = [dict(names=self.groups[kind], lr=lr, base_lr=lr, weight_decay=decay, kind=kind)
                       for kind, lr, decay in (("embed", embed_lr, args.embed_weight_decay),
                                               ("head", args.head_lr, args.embed_weight_decay),
                                               ("scalar", args.scalar_lr, 0.0)) if self.groups[kind]]
        self.adam = AdamW(adam_groups, (args.beta1, args.beta2), args.adam_eps)
        self.muon = Muon(self.groups["matrix"], args.matrix_lr, args.muon_momentum, args.muon_backend_steps,
                         args.muon_weight_decay, args.muon_row_norm, dtype)
        self.args = args

    def apply_schedules(self, step: int, scale: float) -> None:
        for group in self.adam.groups:
            group["lr"] = group["base_lr"] * scale
        self.muon.lr = self.muon.base_lr * scale
        self.muon.momentum = train_gpt.muon_momentum(step, self.args)

    def step(self, model: GPT, grads: dict[str, mx.array]) -> None:
        params = dict(tree_flatten(model.trainable_parameters()))
        self.adam.update(params, grads)
        self.muon.update(params, grads)
        model.update(tree_unflatten(list(params.items())))

    def state(self) -> list:
        return [self.adam.state, self.muon.state]


def clip_grad_norm(grads: dict[str, mx.array], max_norm: float) -> dict[str, mx.array]:
    """torch.nn.utils.clip_grad_norm_: scale every gradient by min(1, max_norm / (total norm + 1e-6))."""
    total = mx.sqrt(sum(mx.sum(mx.square(g.astype(mx.float32))) for g in grads.values()))
    coef = mx.minimum(max_norm / (total + 1e-6), 1.0)
    return {name: g * coef.astype(g.dtype) for name, g in grads.items()}


# -----------------------------------------------------------------------------
# Training loop
# -----------------------------------------------------------------------------
def loss_and_grad_fn(model: GPT, args: Hyperparameters):
    """(x, y) -> ((objective, cross-entropy), gradients of the objective w.r.t. the trainable parameters)."""
    def objective(x, y):
        return training_loss(model(x), y, args.z_loss_weight)
    grad_fn = nn.value_and_grad(model, objective)
    if args.model_compile != "0":  # MLX traces in milliseconds, so auto compiles on every device (results are identical)
        grad_fn = mx.compile(grad_fn, inputs=model.state, outputs=model.state)
    return grad_fn


def train_step(grad_fn, loader: TokenLoader, args: Hyperparameters, accum: int,
               micro_tokens: int) -> tuple[mx.array, dict[str, mx.array]]:
    """One optimizer step's gradients over `accum` micro-batches; returns (mean cross-entropy, mean gradients)."""
    total, grads = mx.array(0.0), None
    for _ in range(accum):
        x, y = loader.next_batch(micro_tokens, args.train_seq_len)
        (_, ce), micro_grads = grad_fn(x, y)
        micro_grads = dict(tree_flatten(micro_grads))
        grads = micro_grads if grads is None else {n: grads[n] + g for n, g in micro_grads.items()}
        total = total + ce
        if accum > 1:  # bound memory to one micro-batch of activations: the graph would otherwise hold them all
            mx.eval(total, grads)
    return total / accum, {n: g / accum for n, g in grads.items()}


def optimizer_step(model: GPT, optimizers: Optimizers, grads: dict[str, mx.array], args: Hyperparameters) -> None:
    if args.grad_clip_norm > 0:
        grads = clip_grad_norm(grads, args.grad_clip_norm)
    optimizers.step(model, grads)


def peak_memory_mib() -> float:
    if mx.default_device().type == mx.DeviceType.gpu:
        return mx.get_peak_memory() / 2**20
    import resource
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB on Linux


def progress_eta_s(step: int, elapsed_ms: float, args: Hyperparameters) -> float:
    """Seconds until training ends: the wall-clock cap or ITERATIONS at the mean step time, whichever is first."""
    by_steps = (args.iterations - step) * elapsed_ms / max(step, 1) / 1000.0
    cap_ms = 1000.0 * train_gpt.training_seconds(args)
    return min(by_steps, max(cap_ms - elapsed_ms, 0.0) / 1000.0) if cap_ms > 0 else by_steps


def train(args: Hyperparameters, log: Logger, model: GPT, val_ctx: StreamContext,
          status: train_gpt.RunStatus) -> dict[str, float]:
    """Warm-up, then the timed step loop, with train_gpt.train's schedule, stops and log lines."""
    optimizers = Optimizers(model, args, model.dtype)
    sizes = {name: p.size for name, p in tree_flatten(model.trainable_parameters())}
    for kind, names in optimizers.groups.items():
        log(f"param_group:{kind} tensors:{len(names)} params:{sum(sizes[n] for n in names)}")
    accum, micro_tokens = train_gpt.grad_accum_steps(args, 1)
    log(f"grad_accum_steps:{accum} micro_batch_tokens_per_rank:{micro_tokens}")
    grad_fn = loss_and_grad_fn(model, args)

    # Compile warm-up on training tokens; the weights are restored after. Its steps after the first (which
    # compiles) also time a step, for the WARMDOWN_ITERS projection (as in train_gpt.train).
    warmup_step_ms = 0.0
    status.phase = "compilation and warm-up"
    if args.warmup_steps:
        initial = model.trainable_parameters()
        warm_loader = TokenLoader(args.data_path, model.vocab_size)
        warm_opts = Optimizers(model, args, model.dtype)
        for i in range(args.warmup_steps):
            if i == 1:
                t_warm = time.perf_counter()
            _, grads = train_step(grad_fn, warm_loader, args, accum, micro_tokens)
            optimizer_step(model, warm_opts, grads, args)
            mx.eval(model.parameters(), warm_opts.state())
        if args.warmup_steps > 1:
            warmup_step_ms = 1000.0 * (time.perf_counter() - t_warm) / (args.warmup_steps - 1)
        model.update(initial)
        log(f"warmup_steps:{args.warmup_steps} done (weights and optimizer state restored) step_ms:{warmup_step_ms:.1f}")

    loader = TokenLoader(args.data_path, model.vocab_size)
    ema = None
    max_ms = 1000.0 * train_gpt.training_seconds(args)
    if args.max_wallclock_seconds > 0 and max_ms <= 0:
        raise ConfigError(f"CALIB_MAX_SECONDS={args.calib_max_seconds} leaves no training time in "
                          f"MAX_WALLCLOCK_SECONDS={args.max_wallclock_seconds}")
    tokens_per_step = args.train_batch_tokens
    train_ms, step, last_loss, stop_step = 0.0, 0, float("nan"), args.iterations
    status.phase = "training"
    t0 = last_log = time.perf_counter()
    while True:
        last_step = step == stop_step
        if last_step or (args.val_loss_every and step % args.val_loss_every == 0 and step > 0):
            train_ms += 1000.0 * (time.perf_counter() - t0)
            totals = train_gpt.reduce_scored(evaluate_windows(model, val_ctx, val_ctx.seq_len,
                                                              train_gpt.Progress(log, f"val step:{step}")), SINGLE)
            log(f"{train_gpt.step_label(step, train_ms, args)} val_loss:{totals.val_loss:.4f} "
                f"val_bpb:{totals.val_bpb:.4f} train_time:{train_ms:.0f}ms step_avg:{train_ms / max(step, 1):.2f}ms")
            t0 = time.perf_counter()
        if last_step:
            break
        elapsed_ms = train_ms + 1000.0 * (time.perf_counter() - t0)
        scale = train_gpt.lr_scale(step, elapsed_ms, args, elapsed_ms / step if step else warmup_step_ms)
        optimizers.apply_schedules(step, scale)
        loss, grads = train_step(grad_fn, loader, args, accum, micro_tokens)
        optimizer_step(model, optimizers, grads, args)
        step += 1
        status.step = step
        if args.ema_decay > 0:
            params = dict(tree_flatten(model.trainable_parameters()))
            if ema is None and train_gpt.training_progress(step, elapsed_ms, args) >= args.ema_start_frac:
                ema = params
            elif ema is not None:
                ema = {name: s + (params[name] - s) * (1.0 - args.ema_decay) for name, s in ema.items()}
        mx.eval(loss, model.parameters(), optimizers.state(), ema or {})
        last_loss_now = loss.item()
        if not math.isfinite(last_loss_now):
            raise FloatingPointError(f"non-finite training loss at step {step}; last finite train_loss:{last_loss:.4f} "
                                     f"lr_scale:{scale:.3f}; lower the learning rates or enable GRAD_CLIP_NORM")
        last_loss = last_loss_now
        now = time.perf_counter()
        elapsed_ms = train_ms + 1000.0 * (now - t0)
        if step % args.train_log_every == 0 or step == 1 or now - last_log >= train_gpt.PROGRESS_SECONDS:
            last_log = now
            log(f"{train_gpt.step_label(step, elapsed_ms, args)} train_loss:{last_loss:.4f} lr_scale:{scale:.3f} "
                f"tok_s:{step * tokens_per_step / (elapsed_ms / 1000.0):.0f} train_time:{elapsed_ms:.0f}ms "
                f"step_avg:{elapsed_ms / step:.2f}ms remaining:{max(max_ms - elapsed_ms, 0.0) / 1000.0:.0f}s "
                f"eta:{progress_eta_s(step, elapsed_ms, args):.0f}s")
        if max_ms > 0 and elapsed_ms + elapsed_ms / step >= max_ms:  # the next step would end past the cap
            stop_step = step
        if status.sigterm:  # SIGTERM in the step loop stops at a step boundary (train_gpt.RunStatus)
            raise train_gpt.RunStopped(f"SIGTERM: stopped after step {step}", signal.SIGTERM)
    train_tok_s = step * tokens_per_step / max(train_ms / 1000.0, 1e-9)
    log(f"train_done steps:{step} train_time:{train_ms:.0f}ms tok_s:{train_tok_s:.0f}")
    log(f"peak_mem_mib:{peak_memory_mib():.0f}")
    status.phase = "post-training"
    if ema is not None:
        model.update(tree_unflatten(list(ema.items())))
        log(f"ema: applied decay {args.ema_decay} weights")
    return {"steps": step, "train_ms": train_ms, "tok_s": train_tok_s}


def calibrate_ternary(model: GPT, args: Hyperparameters, log: Logger) -> GPT:
    """train_gpt.calibrate_ternary, run by torch on the CPU on these weights (within CALIB_MAX_SECONDS, like there);
    returns the model with the thresholds and scale multipliers it chose."""
    if args.calib_max_evals == 0 or args.weight_quant != "ternary":
        return model
    log("calibration: train_gpt.calibrate_ternary in torch on the CPU")
    torch_model = to_torch(model)
    train_gpt.calibrate_ternary(torch_model, args, SINGLE, log)
    return to_mlx(torch_model, model.dtype)


def fit_temperature(model: GPT, args: Hyperparameters, log: Logger) -> None:
    """train_gpt.fit_temperature: the logit temperature with the least loss on training tokens, stored as fp16."""
    if not args.eval_temperature_fit:
        return
    t0 = time.perf_counter()
    x, y = (mx.array(t.numpy().astype(np.int32)) for t in train_gpt.calibration_batch(args, SINGLE))
    grid = torch.linspace(0.7, 1.3, 61).tolist()
    model._logit_temperature = mx.array(1.0)
    logits = model(x)
    losses = [np.array(token_losses(logits / t, y)).astype(np.float64).sum() for t in grid]
    best = grid[int(np.argmin(losses))]
    model._logit_temperature = mx.array(float(torch.tensor(best).to(torch.float16)))  # as the artifact stores it
    log(f"temperature_fit T:{float(model._logit_temperature):.4f} time:{1000.0 * (time.perf_counter() - t0):.0f}ms")


# -----------------------------------------------------------------------------
# Export: train_gpt.py's exporter, on the torch model holding these weights
# -----------------------------------------------------------------------------
def export_and_reload(model: GPT, args: Hyperparameters, log: Logger, status: train_gpt.RunStatus) -> Path:
    """Write the artifact with train_gpt.export_and_reload (the same bytes train_gpt.py would write for these
    weights); its code_bytes count train_gpt.py, the file a submission ships."""
    return train_gpt.export_and_reload(to_torch(model), args, SINGLE, log, status)


# -----------------------------------------------------------------------------
# Evaluation: the forward in MLX; windows, chunks, bytes and totals from train_gpt.py
# -----------------------------------------------------------------------------
SINGLE = Runtime(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), distributed=False)


def score_windows(model: GPT, ctx: StreamContext, windows: list[train_gpt.Window],
                  engram: train_gpt.EvalEngram | None = None, progress: train_gpt.Progress | None = None) -> torch.Tensor:
    """Per-target losses (nats, float32) of the windows' scored targets, in target order (train_gpt.score_windows).
    With an EvalEngram, train_gpt.py's own n-gram mix (on the CPU) turns the model's log-probabilities into the scored
    distribution."""
    val = ctx.val.numpy()
    losses = []
    for i in range(0, len(windows), ctx.batch_windows):
        group = windows[i:i + ctx.batch_windows]
        x = mx.array(np.stack([val[w.start:w.start + ctx.seq_len] for w in group]).astype(np.int32))
        hidden = model.hidden_states(x)
        rows = mx.concatenate([hidden[j, w.first - w.start - 1:w.end - w.start - 1] for j, w in enumerate(group)])
        targets = np.concatenate([np.arange(w.first, w.end) for w in group])
        logits = model.logits(rows)
        if engram is None:
            losses.append(torch.from_numpy(np.array(token_losses(logits, mx.array(val[targets].astype(np.int32))))))
        else:
            logp = torch.from_numpy(np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True)))
            logp = engram.score(logp, ctx.val, ctx.last_bos, torch.from_numpy(targets))
            losses.append(-logp.gather(-1, ctx.val[targets].unsqueeze(-1)).squeeze(-1))
        if progress is not None:
            progress.advance(targets.size)
    return torch.cat(losses) if losses else torch.zeros(0)


def evaluate_windows(model: GPT, ctx: StreamContext, stride: int,
                     progress: train_gpt.Progress | None = None) -> train_gpt.ScoredTargets:
    """Plain (stride == seq_len) or sliding-window scoring of every target once; progress lines with the ETA."""
    windows = train_gpt.plan_windows(1, ctx.num_targets + 1, ctx.num_targets, ctx.seq_len, stride)
    if progress is not None:
        progress.total = ctx.num_targets
    return train_gpt.scored(ctx, 1, ctx.num_targets + 1, score_windows(model, ctx, windows, progress=progress))


def ttt_parameter_names(model: GPT, scope: str) -> list[str]:
    """What test-time training may move: the parameters whose role's TTT scope includes `scope`."""
    in_scope = ("scalars",) if scope == "scalars" else ("scalars", "all")
    return [name for name, role in parameter_roles(model).items() if train_gpt.ROLES[role].ttt_scope in in_scope]


def ttt_train_on_chunk(model: GPT, grad_fn, ctx: StreamContext, lo: int, hi: int, momentum: dict[str, mx.array],
                       args: Hyperparameters) -> None:
    """SGD with momentum (torch.optim.SGD) on the already-scored targets lo..hi-1."""
    starts = train_gpt.ttt_sequence_starts(lo, hi, ctx.seq_len)
    val = ctx.val.numpy().astype(np.int32)
    for _ in range(args.ttt_epochs):
        for i in range(0, len(starts), ctx.batch_windows):
            batch = starts[i:i + ctx.batch_windows]
            x = mx.array(np.stack([val[s:s + ctx.seq_len] for s in batch]))
            y = mx.array(np.stack([val[s + 1:s + ctx.seq_len + 1] for s in batch]))
            _, grads = grad_fn(x, y)
            grads = dict(tree_flatten(grads))
            if args.ttt_grad_clip > 0:
                grads = clip_grad_norm(grads, args.ttt_grad_clip)
            params = dict(tree_flatten(model.trainable_parameters()))
            for name, g in grads.items():
                momentum[name] = momentum[name] * args.ttt_momentum + g if name in momentum else g
                params[name] = params[name] - args.ttt_lr * momentum[name]
            model.update(tree_unflatten(list(params.items())))
            mx.eval(model.parameters(), momentum)


def evaluate_streaming(model: GPT, ctx: StreamContext, args: Hyperparameters, ttt: bool, engram: bool,
                       progress: train_gpt.Progress | None = None) -> train_gpt.ScoredTargets:
    """Score-first evaluation (train_gpt.evaluate_streaming on one device): score a chunk of EVAL_CHUNK_TOKENS
    targets, then let it update the state (a TTT step), then move on; the EvalEngram memory counts each target as
    soon as it is scored. TTT trains a copy: the artifact's own model is left untouched."""
    stride = args.sliding_eval_stride or ctx.seq_len
    chunks = train_gpt.score_first_chunks(ctx.num_targets, args.eval_chunk_tokens)
    if ttt:
        model = clone_model(model)
        names = ttt_parameter_names(model, args.ttt_scope)
        model.freeze()
        owners = dict(model.named_modules())
        for name in names:
            prefix, _, local = name.rpartition(".")
            owners[prefix].unfreeze(keys=[local], recurse=False)
        grad_fn = nn.value_and_grad(model, lambda x, y: token_losses(model(x), y).mean())
        momentum: dict[str, mx.array] = {}
    memory = train_gpt.EvalEngram(args, model.vocab_size, SINGLE.device) if engram else None
    if progress is not None:
        progress.total = ctx.num_targets
    losses = []
    for lo, hi in chunks:
        losses.append(score_windows(model, ctx, train_gpt.plan_windows(lo, hi, ctx.num_targets, ctx.seq_len, stride),
                                    memory, progress))
        if ttt and (lo, hi) != chunks[-1]:
            ttt_train_on_chunk(model, grad_fn, ctx, lo, hi, momentum, args)
    return train_gpt.scored(ctx, 1, ctx.num_targets + 1, torch.cat(losses))


def run_eval_mode(model: GPT, ctx: StreamContext, options: dict, args: Hyperparameters,
                  progress: train_gpt.Progress) -> train_gpt.ScoredTargets:
    if options["kind"] == "windows":
        return evaluate_windows(model, ctx, options["stride"], progress)
    return evaluate_streaming(model, ctx, args, options["ttt"], options["engram"], progress)


# -----------------------------------------------------------------------------
# Main
# -----------------------------------------------------------------------------
OPENBLAS_PRELOAD = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0"


def cpu_blas_line(on_gpu: bool, system: str, environ: dict[str, str]) -> str | None:
    """Which BLAS the CPU matmuls run on, where that matters: the mlx[cpu] wheel for Linux bundles the reference
    BLAS (unoptimised, one core), and MLX calls the first cblas_sgemm the process's global scope offers, so an
    optimised BLAS named in LD_PRELOAD replaces it (bench/README.md has the measurement)."""
    if on_gpu or system != "Linux":
        return None  # Metal, or macOS's Accelerate
    preloaded = [Path(lib).name for lib in environ.get("LD_PRELOAD", "").replace(":", " ").split()
                 if "blas" in Path(lib).name or "mkl" in Path(lib).name]
    if preloaded:
        return f"cpu_blas:{','.join(preloaded)} (LD_PRELOAD)"
    return ("WARNING: cpu_blas:reference (the BLAS bundled with mlx[cpu] on Linux: one core, about a twentieth of "
            f"train_gpt.py's speed); preload an optimised one, e.g. LD_PRELOAD={OPENBLAS_PRELOAD} "
            "(Debian/Ubuntu package libopenblas0-pthread)")


def environment_lines(dtype: mx.Dtype, why: str) -> list[str]:
    blas = cpu_blas_line(mx.default_device().type == mx.DeviceType.gpu, platform.system(), dict(os.environ))
    return [f"python:{platform.python_version()} mlx:{mx.__version__} numpy:{np.__version__} torch:{torch.__version__} "
            "(torch: initial weights, export and score bookkeeping only)",
            f"platform:{platform.platform()} cpu_count:{os.cpu_count()} world_size:1 device:{mx.default_device()}",
            f"compute_dtype:{str(dtype).split('.')[-1]} ({why})"] + ([blas] if blas else [])


def main(environ: dict[str, str] | None = None) -> None:
    """train_gpt.main on one MLX device: the same start-up checks, outputs, stop reasons and failed-artifact naming."""
    args = Hyperparameters(environ)
    check_twin_support(args)
    if args.dry_run != "0":
        train_gpt.dry_run(args, os.environ if environ is None else environ)
        return
    args = args.replace({"RUN_ID": args.run_id or time.strftime("%Y%m%d_%H%M%S_mlx")})
    log = train_gpt.open_run_log(args, SINGLE)
    status = train_gpt.RunStatus()
    status.install()
    try:
        run(args, log, status)
    except BaseException as error:
        if status.artifact is not None:
            os.replace(status.artifact, train_gpt.artifact_path(args, "failed"))
            log(f"artifact renamed to {train_gpt.artifact_path(args, 'failed')}: the run failed after writing it")
        log(train_gpt.stop_reason(error, status))
        raise
    finally:
        status.uninstall()
    log(f"stop_reason:completed steps:{status.step}")


def run(args: Hyperparameters, log: Logger, status: train_gpt.RunStatus) -> None:
    """Check every input (train_gpt.check_inputs), then train, calibrate, export and evaluate (or evaluate
    EVAL_ARTIFACT)."""
    inputs = train_gpt.check_inputs(args, 1)
    shard_line = train_gpt.check_all_shards(inputs, SINGLE)
    dtype, why = compute_dtype(args)
    for line in (inputs.artifact_args or args).lines() + environment_lines(dtype, why):
        log(line)
    if inputs.artifact_args is not None:
        log(f"model settings: from the artifact {args.eval_artifact}, not from the environment")
    log(shard_line)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    mx.random.seed(args.seed)
    vocab_size = inputs.vocab_size
    args = args.replace({"VOCAB_SIZE": vocab_size})
    tables = train_gpt.build_byte_tables(inputs.sp, vocab_size, SINGLE.device)
    val_tokens = train_gpt.load_validation_tokens(args.data_path, args.train_seq_len, vocab_size,
                                                  args.val_max_tokens, args.eval_len)
    log(f"val_tokens:{val_tokens.size - 1}")
    if args.val_max_tokens:
        log(f"WARNING: PARTIAL VALIDATION: VAL_MAX_TOKENS={args.val_max_tokens} scores {val_tokens.size - 1} tokens; "
            "val_bpb below is not the competition figure")
    log("attn_backend:mlx_fast_sdpa")
    train_ctx = train_gpt.stream_context(val_tokens, tables, args.train_seq_len, args.val_batch_size, SINGLE)
    eval_ctx = train_ctx if args.eval_len == args.train_seq_len else train_gpt.stream_context(
        val_tokens, tables, args.eval_len, args.val_batch_size, SINGLE)
    if args.eval_artifact:
        log(f"eval_artifact:{args.eval_artifact} (no training)")
        (config, records), read_ms = inputs.artifact, inputs.artifact_read_ms
    else:
        initial = train_gpt.GPT(args, vocab_size)  # train_gpt.py's initialization from SEED: both twins start alike
        log("params " + " ".join(f"{k}:{v}" for k, v in train_gpt.count_parameters(initial).items()))
        model = to_mlx(initial, dtype)
        del initial
        summary = train(args, log, model, train_ctx, status)
        t0 = time.perf_counter()
        status.phase = "calibration"
        model = calibrate_ternary(model, args, log)
        fit_temperature(model, args, log)
        if train_gpt.post_training_fits(args):
            fit_ms = 1000.0 * (time.perf_counter() - t0)
            log(f"post_training_time:{fit_ms:.0f}ms total_training_time:{summary['train_ms'] + fit_ms:.0f}ms "
                f"of MAX_WALLCLOCK_SECONDS={args.max_wallclock_seconds}")
        status.phase = "evaluation"
        train_gpt.log_eval(log, "final_prequant", lambda progress: evaluate_windows(model, eval_ctx, args.eval_len, progress),
                           SINGLE, args)
        status.phase = "export"
        path = export_and_reload(model, args, log, status)
        t0 = time.perf_counter()
        config, records = train_gpt.read_artifact(path)
        read_ms = 1000.0 * (time.perf_counter() - t0)
    status.phase = "evaluation"
    t0 = time.perf_counter()
    loaded = to_mlx(train_gpt.model_from_records(config, records, args), dtype)
    load_ms = read_ms + 1000.0 * (time.perf_counter() - t0)
    log(f"artifact_load_and_warmup_time:{load_ms:.0f}ms")
    train_gpt.log_eval(log, f"final_{loaded.export_name}_roundtrip",
                       lambda progress: evaluate_windows(loaded, eval_ctx, args.eval_len, progress), SINGLE, args, load_ms)
    for key, options in train_gpt.eval_modes(args):
        train_gpt.log_eval(log, key, lambda progress: run_eval_mode(loaded, eval_ctx, options, args, progress), SINGLE,
                           args, load_ms)


if __name__ == "__main__":
    try:
        main()
    except BaseException as error:  # noqa: B036 (SIGINT and SIGTERM get their own exit status)
        if isinstance(error, SystemExit):
            raise
        sys.exit(train_gpt.exit_status(error))
