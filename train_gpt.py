"""skc-golf trainer: a ternary (BitNet b1.58) U-Net GPT for OpenAI's Parameter Golf.

One self-contained file, read top to bottom in the order data flows:
hyperparameters -> data -> tokenizer/bpb -> quantization primitives -> model ->
optimizers -> training loop -> calibration & export -> evaluation -> main.

GPU:  torchrun --standalone --nproc_per_node=8 train_gpt.py
CPU:  python train_gpt.py
Configuration comes from environment variables (see Hyperparameters).
"""
from __future__ import annotations

import copy
import ctypes
import difflib
import glob
import hashlib
import io
import json
import lzma
import math
import os
import pickle
import platform
import random
import re
import signal
import sys
import tempfile
import threading
import time
import uuid
import zlib
from datetime import timedelta
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

# -----------------------------------------------------------------------------
# Hyperparameters
# -----------------------------------------------------------------------------
# Every setting is an environment variable. Names shared with the official
# baseline keep its spelling. Any variable that starts with one of ENV_PREFIXES
# (or ends with ENV_SUFFIXES) but is not a setting stops the run: a typo must
# never fall back to a default silently. A prefix is reserved only once a
# feature that owns it exists: a feature adds its prefix to this tuple in the
# same change that adds its settings (see the README's feature-block convention).
ENV_PREFIXES = ("TTT_", "EVAL_", "CALIB_", "MUON_", "ADAM_", "EXPORT_", "TERNARY_", "TURBO_QUANT_", "EMA_", "SLIDING_",
                "TRAIN_", "VAL_", "WARMDOWN_", "WARMUP_", "QK_", "ROPE_", "MLP_", "EMBED_", "LOGIT_", "SOFTCAP_", "NUM_",
                "MODEL_", "TIED_", "FP_", "ATTN_", "SIZE_", "SUBMISSION_",
                "CHECKPOINT_", "RESUME_", "ENGRAM_", "BIGRAM_HASH_", "MOE_", "XSA_", "VRL_", "SMEAR_", "SMEARGATE_",
                "LN_SCALE_", "SKC_", "CAPSULE_", "KOOPMAN_", "FEEDBACK_", "ADAPTIVE_HALT_", "SHARED_", "RECURRENCE_")
ENV_SUFFIXES = ("_LR",)

# `build_submission.py extract` rewrites these two in the file it writes; the full trainer removes and folds
# nothing. REMOVED_SETTINGS: NAME -> the value the file was extracted with (the only value it still accepts,
# so the same env file can drive it). folded_branches(args): (value now, value at extraction, source) of each
# branch condition the extraction replaced by a constant; a setting that would flip one stops the run.
REMOVED_SETTINGS: dict[str, str] = {}


def folded_branches(args) -> tuple:
    return ()


# Variables of the shell, launchers and libraries that we run beside: never taken for a misspelt setting.
FOREIGN_ENV_NAMES = frozenset(("PATH", "HOME", "USER", "SHELL", "PWD", "OLDPWD", "TERM", "LANG", "TMPDIR", "HOSTNAME",
                               "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                               "ROLE_RANK", "ROLE_NAME", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                               "NPROC_PER_NODE", "TORCHRUN"))
FOREIGN_ENV_PREFIXES = ("CUDA_", "NCCL_", "TORCH", "OMP_", "MKL_", "KMP_", "PYTHON", "HF_", "LC_", "XDG_", "SSH_",
                        "GIT_", "CONDA", "VIRTUAL_ENV", "PIP_", "TRITON_", "GLOO_", "NVIDIA_", "LD_", "MLX_", "SLURM_",
                        "OMPI_", "PMI_", "PMIX_", "KUBERNETES_")


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance where swapping two neighbouring characters also costs one edit."""
    rows = [list(range(len(b) + 1))]
    for i, ca in enumerate(a, 1):
        row = [i]
        for j, cb in enumerate(b, 1):
            row.append(min(rows[-1][j] + 1, row[j - 1] + 1, rows[-1][j - 1] + (ca != cb)))
            if i > 1 and j > 1 and ca == b[j - 2] and a[i - 2] == cb:
                row[j] = min(row[j], rows[-2][j - 2] + 1)
        rows.append(row)
    return rows[-1][-1]


def close_setting(name: str, settings) -> str | None:
    """The setting that `name` most likely misspells: equal up to case, or one edit away (two for names longer
    than six characters); None when no setting is that close."""
    upper = name.upper()
    candidates = [(edit_distance(upper, setting), setting) for setting in settings
                  if abs(len(setting) - len(upper)) <= 2]  # more edits than that are needed otherwise
    distance, best = min(candidates, default=(3, ""))
    return best if distance <= (1 if len(best) <= 6 else 2) else None


class ConfigError(ValueError):
    """A setting that does not parse, is out of range, or is unknown."""


class Setting(NamedTuple):
    default: object  # its Python type (bool, int, float, str) is the setting's type
    lo: float | None = None
    hi: float | None = None
    choices: tuple[str, ...] | None = None


def _parse_setting(name: str, raw: str, setting: Setting) -> object:
    kind = type(setting.default)
    text = raw.strip()
    try:
        if kind is bool:
            if text.lower() not in ("0", "1", "true", "false", "yes", "no", "on", "off"):
                raise ValueError
            value = text.lower() in ("1", "true", "yes", "on")
        elif kind is int:
            number = float(text)  # accepts 5e5; a fraction is rejected below
            if not number.is_integer():
                raise ValueError
            value = int(number)
        elif kind is float:
            value = float(text)
            if not math.isfinite(value):
                raise ValueError
        else:
            value = raw
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a valid {kind.__name__}") from None
    if setting.choices is not None and value not in setting.choices:
        raise ConfigError(f"{name}={raw!r} must be one of {', '.join(setting.choices)}")
    if setting.lo is not None and value < setting.lo:
        raise ConfigError(f"{name}={raw!r} must be >= {setting.lo}")
    if setting.hi is not None and value > setting.hi:
        raise ConfigError(f"{name}={raw!r} must be <= {setting.hi}")
    return value


class Hyperparameters:
    """The run's configuration: SETTINGS read from the environment, then checked together."""

    SETTINGS: dict[str, Setting] = {
        # run and data
        "DATA_PATH": Setting("./data/datasets/fineweb10B_sp1024"),
        "TOKENIZER_PATH": Setting("./data/tokenizers/fineweb_1024_bpe.model"),
        "VOCAB_SIZE": Setting(0, lo=0, hi=65536),  # 0: take it from the tokenizer
        "RUN_ID": Setting(""),  # "": generated
        "SEED": Setting(1337, lo=0, hi=2**32 - 1),
        "LOG_DIR": Setting("logs"),
        "ARTIFACT_DIR": Setting(""),  # "": LOG_DIR
        "RUN_OVERWRITE": Setting(False),  # reuse a RUN_ID whose log holds a finished run (its log and artifact go)
        "DRY_RUN": Setting("0", choices=("0", "1", "config")),  # 1: check config and files; config: config only
        # Collective timeouts: a rank that stops answering fails the job after DIST_STEP_TIMEOUT_SECONDS once the
        # step loop runs; start-up, compilation, calibration, export and evaluation get DIST_TIMEOUT_SECONDS.
        "DIST_TIMEOUT_SECONDS": Setting(900, lo=1),
        "DIST_STEP_TIMEOUT_SECONDS": Setting(180, lo=1),
        # training schedule
        "ITERATIONS": Setting(20000, lo=1),
        "WARMUP_STEPS": Setting(20, lo=0),  # compile/allocator warm-up steps, undone before training
        "LR_WARMUP_STEPS": Setting(10, lo=0),  # linear LR warm-up over the first steps
        "WARMDOWN_FRACTION": Setting(0.4, lo=0.0, hi=1.0),  # linear LR decay to 0 over this last share of the budget
        "WARMDOWN_ITERS": Setting(0, lo=0),  # the official baseline's warm-down; > 0 replaces WARMDOWN_FRACTION
        "TRAIN_BATCH_TOKENS": Setting(524288, lo=1),
        "TRAIN_MICRO_BATCH_TOKENS": Setting(65536, lo=1),
        "TRAIN_SEQ_LEN": Setting(1024, lo=2),
        "MAX_WALLCLOCK_SECONDS": Setting(599.0, lo=0.0),
        "VAL_LOSS_EVERY": Setting(1000, lo=0),
        "VAL_BATCH_SIZE": Setting(524288, lo=1),
        "VAL_MAX_TOKENS": Setting(0, lo=0),
        "TRAIN_LOG_EVERY": Setting(200, lo=1),
        "GRAD_CLIP_NORM": Setting(0.0, lo=0.0),
        "MODEL_COMPILE": Setting("auto", choices=("auto", "0", "1")),
        # Same seed and same steps, same weights: torch's deterministic kernels. Compiled CPU training otherwise
        # sums embedding gradients with atomic adds, in an order that changes from run to run.
        "DETERMINISTIC": Setting(False),
        # (checkpoints are off by default: in the 10-minute track their write time counts as training time)
        # feature: checkpoints
        "CHECKPOINT_EVERY": Setting(0, lo=0),  # steps; 0: no step-based checkpoints
        "CHECKPOINT_EVERY_SECONDS": Setting(0.0, lo=0.0),  # wall-clock seconds; 0: no time-based checkpoints
        "CHECKPOINT_KEEP": Setting(2, lo=1),  # newest checkpoints kept; the older ones are deleted
        "CHECKPOINT_DIR": Setting(""),  # "": LOG_DIR/<RUN_ID>_checkpoints (the run folder)
        "RESUME_FROM": Setting(""),  # a checkpoint file, a folder of them, or auto (the run folder); "": start fresh
        "RESUME_ALLOW_CONFIG_CHANGE": Setting(False),  # resume although training settings changed (printed)
        # model
        "NUM_LAYERS": Setting(12, lo=1, hi=256),
        "MODEL_DIM": Setting(768, lo=8, hi=16384),
        "NUM_HEADS": Setting(12, lo=1, hi=256),
        "NUM_KV_HEADS": Setting(4, lo=1, hi=256),
        "MLP_MULT": Setting(3.0, lo=0.25, hi=16.0),
        "MLP_ACT": Setting("relu2", choices=("relu2", "leaky_relu2")),
        "TIE_EMBEDDINGS": Setting(True),
        "TIED_EMBED_INIT_STD": Setting(0.005, lo=0.0),
        "ROPE_BASE": Setting(10000.0, lo=1.0),
        "ROPE_DIMS": Setting(0, lo=0),  # 0: the full head dim
        "QK_NORM": Setting(True),
        "QK_GAIN_INIT": Setting(1.5, lo=0.0),
        "LOGIT_SOFTCAP": Setting(30.0, lo=0.0),  # 0: no softcap
        "SOFTCAP_TYPE": Setting("tanh", choices=("tanh", "poly")),
        "Z_LOSS_WEIGHT": Setting(0.0, lo=0.0),
        "WEIGHT_QUANT": Setting("ternary", choices=("ternary", "none")),
        "TERNARY_GROUP_SIZE": Setting(128, lo=1, hi=16384),
        "TERNARY_SCALE_FORMAT": Setting("fp16", choices=("fp16", "fp8")),  # how per-group scales are stored
        "ATTN_BACKEND": Setting("auto", choices=("auto", "fa3", "fa2", "sdpa")),
        # optimizers
        "EMBED_LR": Setting(0.6, lo=0.0),
        "HEAD_LR": Setting(0.008, lo=0.0),
        "TIED_EMBED_LR": Setting(0.05, lo=0.0),
        "MATRIX_LR": Setting(0.04, lo=0.0),
        "SCALAR_LR": Setting(0.04, lo=0.0),
        "MUON_MOMENTUM": Setting(0.95, lo=0.0, hi=0.9999),
        "MUON_BACKEND_STEPS": Setting(5, lo=1, hi=20),
        "MUON_MOMENTUM_WARMUP_START": Setting(0.85, lo=0.0, hi=0.9999),
        "MUON_MOMENTUM_WARMUP_STEPS": Setting(500, lo=0),
        "MUON_WEIGHT_DECAY": Setting(0.0, lo=0.0),
        "MUON_ROW_NORM": Setting(False),
        "EMBED_WEIGHT_DECAY": Setting(0.0, lo=0.0),
        "BETA1": Setting(0.9, lo=0.0, hi=0.9999),
        "BETA2": Setting(0.95, lo=0.0, hi=0.99999),
        "ADAM_EPS": Setting(1e-8, lo=0.0),
        # calibration and export
        "EXPORT_FORMAT": Setting("ternary", choices=("ternary", "int8_zlib")),
        "EXPORT_FP_FORMAT": Setting("fp8", choices=("fp8", "fp4", "fp16")),  # non-ternary matrices
        "EXPORT_FP16_PATTERNS": Setting("tok_emb,lm_head"),  # comma-separated name parts always kept in fp16
        "EXPORT_CLIP_SEARCH": Setting(True),  # int8 export: per-tensor clip ratio with the least error (GPTQ-lite)
        "EXPORT_CODEC": Setting("auto", choices=("auto", "brotli", "lzma")),
        "SIZE_CAP_BYTES": Setting(16_000_000, lo=1),
        "SIZE_MARGIN_BYTES": Setting(20_000, lo=0),
        "SUBMISSION_MODE": Setting(False),  # fail the run when code + model + margin exceed the cap
        "CALIB_TOKENS": Setting(32768, lo=1),  # training tokens a post-training fit reads (all ranks together)
        "CALIB_MAX_SECONDS": Setting(30.0, lo=0.0),  # the post-training fits' share of MAX_WALLCLOCK_SECONDS
        # evaluation
        "EVAL_ARTIFACT": Setting(""),  # path: skip training and evaluate this artifact
        "EVAL_SEQ_LEN": Setting(0, lo=0),  # 0: TRAIN_SEQ_LEN
        "EVAL_CHUNK_TOKENS": Setting(32768, lo=1),  # score-first chunk of TTT
        "EVAL_MAX_SECONDS": Setting(600.0, lo=0.0),
        "EVAL_DUMP_TOKEN_LOSSES": Setting(""),  # path.npz: per-target losses and bytes of every mode
        # feature: ema
        "EMA_DECAY": Setting(0.0, lo=0.0, hi=0.999999),  # 0: off
        "EMA_START_FRAC": Setting(0.5, lo=0.0, hi=1.0),
        # feature: factored_embedding
        "EMBED_DIM": Setting(0, lo=0, hi=16384),  # 0: off (MODEL_DIM); smaller: factored tied embedding
        # feature: fp_storage_sim
        "FP_STORAGE_SIM": Setting("none", choices=("none", "fp8", "fp4")),
        # feature: turbo_quant
        "TURBO_QUANT_TRAIN": Setting(False),  # train ternary layers in a blockwise-Hadamard-rotated input basis
        "TURBO_QUANT_EXPORT": Setting(False),  # Hadamard-rotate ternary weights before export quantization
        # feature: calibration
        "CALIB_MAX_EVALS": Setting(0, lo=0),  # 0: off
        "CALIB_MIN_PARAMS": Setting(65536, lo=0),  # size prefilter: smaller tensors keep their defaults
        # feature: temperature_fit
        "EVAL_TEMPERATURE_FIT": Setting(False),  # fit a logit temperature on training tokens
        # feature: sliding_window
        "SLIDING_EVAL_STRIDE": Setting(0, lo=0),  # 0: off
        # feature: eval_engram
        "EVAL_ENGRAM": Setting(False),  # its defaults: best on the proxy (bench/ablations/proxy.md)
        "EVAL_ENGRAM_ORDER": Setting(4, lo=2, hi=8),
        "EVAL_ENGRAM_BUCKETS": Setting(262144, lo=1),  # per order above 2: buckets x vocab float32 counts (1 GiB)
        "EVAL_ENGRAM_ALPHA": Setting(0.1, lo=1e-6),  # Laplace smoothing of the lowest order
        "EVAL_ENGRAM_WEIGHT": Setting(0.45, lo=0.0),
        "EVAL_ENGRAM_CENTER": Setting(2.0),  # model entropy (nats) where the gate is half open
        "EVAL_ENGRAM_BACKOFF": Setting(1.0, lo=0.0),  # pseudo-counts of the order below; 0: the top order alone
        "EVAL_ENGRAM_MIX": Setting("linear", choices=("log", "linear")),  # log: gate * log q added; linear: gate * q
        # feature: ttt
        "TTT_ENABLED": Setting(False),
        "TTT_SCOPE": Setting("scalars", choices=("scalars", "all")),
        "TTT_LR": Setting(0.002, lo=0.0),
        "TTT_MOMENTUM": Setting(0.9, lo=0.0, hi=0.9999),
        "TTT_EPOCHS": Setting(1, lo=1),
        "TTT_GRAD_CLIP": Setting(1.0, lo=0.0),
        # feature: engram_hash
        "ENGRAM_ENABLED": Setting(False),  # hashed n-gram memory trained with the network
        "ENGRAM_NUM_HEADS": Setting(2, lo=1, hi=8),  # hash functions (tables) per order
        "ENGRAM_NUM_ORDERS": Setting(2, lo=1, hi=4),  # n-gram orders 2 .. ENGRAM_NUM_ORDERS+1
        "ENGRAM_BUCKETS": Setting(4096, lo=1),  # rows per table
        "ENGRAM_DIM": Setting(128, lo=1),  # memory width, split evenly over orders x heads
        "ENGRAM_LAYER": Setting(1, lo=0),  # the encoder block whose input receives the memory
        "ENGRAM_LR": Setting(0.05, lo=0.0),  # Adam LR of the tables
        # feature: moe
        "MOE_ENABLED": Setting(False),  # ternary mixture of experts in place of the MLP of the upper layers
        "MOE_NUM_EXPERTS": Setting(4, lo=2, hi=64),
        "MOE_TOP_K": Setting(1, lo=1),
        "MOE_LAYER_FRAC": Setting(0.5, lo=0.0, hi=1.0),  # share of the layers (the last ones) that route
        "MOE_START_FRACTION": Setting(0.0, lo=0.0, hi=1.0),  # share of the training clock run densely first
        "MOE_ROUTER_AUX_LOSS_COEF": Setting(0.01, lo=0.0),  # load-balance loss weight
        "MOE_ROUTER_Z_LOSS_COEF": Setting(0.001, lo=0.0),  # router z-loss weight
        "MOE_ROUTER_TEMPERATURE": Setting(1.0, lo=1e-3),  # router logits are divided by it
        # feature: xsa
        "XSA_LAST_N": Setting(0, lo=0),  # the last N layers' attention drops its component along the own value
        # feature: vrl
        "VRL_ENABLED": Setting(False),  # value residual: layer-0 values blended into every later attention layer
        # feature: smear_gate
        "SMEAR_GATE": Setting(False),  # blend the previous token's embedding in through a learned gate
        # feature: ln_scale_damping
        "LN_SCALE_DAMPING": Setting(False),  # scale each block's normed inputs by 1/sqrt(layer index + 1)
        # The SKC model (issue 9): every component off until the CPU proxy ablation (bench/ablations/skc.md) says
        # otherwise. ARCHITECTURE=skc_competition (the design's spelling) reads as skc.
        # feature: skc_mixer
        "ARCHITECTURE": Setting("transformer", choices=("transformer", "skc", "hybrid")),  # token mixer of each layer
        "SKC_LAYERS": Setting(""),  # hybrid: comma-separated layers with the SKC mixer ("": the even layers)
        "SKC_CHUNK": Setting(32, lo=1),  # scan chunk width (SKC mixer and capsule bank); must divide TRAIN_SEQ_LEN
        "SKC_CONV_KERNEL": Setting(4, lo=1, hi=16),  # taps of the causal depthwise convolution
        "SKC_SPECTRAL_WEIGHT": Setting(0.0, lo=0.0),  # aux loss on decay memory longer than the training window
        # feature: capsules
        "CAPSULE_ENABLED": Setting(False),  # causal capsule summary of the encoder output, injected into the decoder
        "CAPSULE_NUM": Setting(8, lo=0),
        "CAPSULE_DIM": Setting(16, lo=1),
        # feature: capsule_carry
        "CAPSULE_CARRY": Setting(False),  # evaluation: capsule sums also count the document's positions before the window
        "CAPSULE_CARRY_DECAY": Setting(0.99, lo=0.0, hi=1.0),  # weight per position of distance before the window
        # feature: koopman
        "KOOPMAN_ENABLED": Setting(False),  # one step of D + UV^T dynamics on the capsule state
        "KOOPMAN_RANK": Setting(2, lo=0),
        "KOOPMAN_LR": Setting(0.01, lo=0.0),  # its own Adam group, without weight decay
        "KOOPMAN_CONSISTENCY_WEIGHT": Setting(0.0, lo=0.0),  # the step predicts the next feedback pass's state
        # feature: feedback_passes
        "FEEDBACK_PASSES": Setting(0, lo=0, hi=8),  # decoder re-runs with the refined capsule state
        "FEEDBACK_EVERY": Setting(1, lo=1),  # training runs them on every N-th step (evaluation: always)
        "ADAPTIVE_HALT_ENABLED": Setting(False),  # evaluation: a position stops refining once its state settles
        "ADAPTIVE_HALT_THRESHOLD": Setting(0.01, lo=0.0),  # relative capsule update norm under which it halts
        # feature: shared_blocks
        "SHARED_BLOCKS": Setting(0, lo=0),  # 0: off; S: layer i runs the mixer and MLP of layer i % S
        # feature: parallel_residual
        "SKC_PARALLEL_RESIDUAL": Setting(False),  # mixer and MLP read the same normed input
        # feature: recurrence
        "RECURRENCE_DEPTH": Setting(0, lo=0, hi=8),  # extra runs of the RECURRENCE_LAYERS band
        "RECURRENCE_LAYERS": Setting(""),  # inclusive band "lo-hi"; "": the two middle layers
        "RECURRENCE_START_FRACTION": Setting(0.0, lo=0.0, hi=1.0),  # of the training clock
    }
    # Names from the design's launch scripts: read as our setting (aliases) or refused with a pointer to it.
    DESIGN_ALIASES: dict[str, str] = {
        # feature: engram_hash
        "BIGRAM_HASH_ENABLED": "ENGRAM_ENABLED",  # the classic BigramHash is ENGRAM_NUM_HEADS=1 ENGRAM_NUM_ORDERS=1
        "BIGRAM_HASH_BUCKETS": "ENGRAM_BUCKETS",
        "BIGRAM_HASH_DIM": "ENGRAM_DIM",
        "ENGRAM_INJECT_LAYER": "ENGRAM_LAYER",
        # feature: smear_gate
        "SMEARGATE_ENABLED": "SMEAR_GATE",
    }
    DESIGN_REFUSED: dict[str, str] = {
        # feature: xsa
        "XSA_START_LAYER": "set XSA_LAST_N instead (the number of final layers with XSA: NUM_LAYERS - XSA_START_LAYER)",
        # feature: vrl
        "VRL_START_LAYER": "VRL_ENABLED=1 blends layer-0 values into every later attention layer; there is no start layer",
        # not implemented (issue 9 names them): refused rather than ignored
        "CURRICULUM_ENABLED": "a sequence-length curriculum is not implemented: unset it (TRAIN_SEQ_LEN is fixed for "
                              "the whole run)",
        "TERNARY_NOISE_SCALE": "weight-noise training is not implemented: unset it (ternary layers train through the "
                               "straight-through estimator alone, see TernaryLinear)",
    }

    def __init__(self, environ: dict[str, str] | None = None):
        env = self._resolve_design_names(os.environ if environ is None else environ)
        self._reject_unknown(env)
        for name, setting in self.SETTINGS.items():
            raw = env.get(name)
            object.__setattr__(self, name.lower(), setting.default if raw is None else _parse_setting(name, raw, setting))
        self._resolve_warmdown(env)
        self._check_relations()

    def __setattr__(self, name: str, value) -> None:
        raise AttributeError(f"Hyperparameters are read-only after construction (tried to set {name}): a value resolved "
                             "at start-up or a changed configuration is a new object, Hyperparameters.replace(...)")

    def replace(self, values: dict[str, object]) -> Hyperparameters:
        """A new configuration: this one with some settings (NAME -> typed value) replaced, checked like a fresh one."""
        other = object.__new__(Hyperparameters)
        other.__dict__.update(self.__dict__)
        other.__dict__.update({name.lower(): value for name, value in values.items() if name in self.SETTINGS})
        other._check_relations()
        return other

    def _resolve_warmdown(self, env) -> None:
        """WARMDOWN_ITERS > 0 (the official baseline's schedule) replaces the default WARMDOWN_FRACTION;
        both set explicitly would leave the schedule ambiguous."""
        if self.warmdown_iters > 0:
            if "WARMDOWN_FRACTION" in env and self.warmdown_fraction > 0:
                raise ConfigError(f"WARMDOWN_ITERS={self.warmdown_iters} and WARMDOWN_FRACTION={self.warmdown_fraction} "
                                  "both set the warm-down: set WARMDOWN_FRACTION=0 to use WARMDOWN_ITERS, or unset "
                                  "WARMDOWN_ITERS")
            object.__setattr__(self, "warmdown_fraction", 0.0)

    @classmethod
    def _resolve_design_names(cls, env) -> dict[str, str]:
        resolved = dict(env)
        if resolved.get("ARCHITECTURE", "").strip() == "skc_competition":  # the design's launch scripts' name for skc
            resolved["ARCHITECTURE"] = "skc"
        for name, message in cls.DESIGN_REFUSED.items():
            if name in env:
                raise ConfigError(f"{name} is a setting of the design that skc-golf does not take: {message}")
        for name, ours in cls.DESIGN_ALIASES.items():
            if name in env:
                if ours in env and env[ours].strip() != env[name].strip():
                    raise ConfigError(f"{name}={env[name]!r} (the design's name for {ours}) contradicts {ours}={env[ours]!r}; "
                                      "set only one of them")
                resolved[ours] = resolved.pop(name)
        return resolved

    @classmethod
    def _reject_unknown(cls, env) -> None:
        for name in sorted(env):
            if name in REMOVED_SETTINGS:
                if env[name] != REMOVED_SETTINGS[name]:
                    raise ConfigError(f"{name}={env[name]!r}: this file was extracted with {name}={REMOVED_SETTINGS[name]!r} "
                                      "and without the code that reads it; unset it, or extract again from train_gpt.py "
                                      "with the changed config (build_submission.py extract)")
                continue
            if name in cls.SETTINGS or name.startswith(FOREIGN_ENV_PREFIXES) or name in FOREIGN_ENV_NAMES:
                continue
            close = close_setting(name, cls.SETTINGS)
            if name.startswith(ENV_PREFIXES) or name.endswith(ENV_SUFFIXES):
                hint = f"; did you mean {close}?" if close else "; unset it or fix the name"
                raise ConfigError(f"unknown setting {name} (its prefix or suffix is reserved for skc-golf){hint}")
            if close:
                raise ConfigError(f"unknown setting {name}: did you mean {close}? (a misspelt setting would silently "
                                  "keep its default; unset the variable or fix its name)")

    def _check_relations(self) -> None:
        def require(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(message)
        require(self.model_dim % self.num_heads == 0, f"MODEL_DIM={self.model_dim} must divide by NUM_HEADS={self.num_heads}")
        require(self.num_heads % self.num_kv_heads == 0,
                f"NUM_HEADS={self.num_heads} must divide by NUM_KV_HEADS={self.num_kv_heads}")
        require(self.head_dim % 2 == 0, f"head dim MODEL_DIM/NUM_HEADS={self.head_dim} must be even for RoPE")
        require(self.rope_dims % 2 == 0 and self.rope_dims <= self.head_dim,
                f"ROPE_DIMS={self.rope_dims} must be even and at most the head dim {self.head_dim}")
        require(self.embed_dim < self.model_dim, f"EMBED_DIM={self.embed_dim} must be below MODEL_DIM={self.model_dim} "
                "(0: an unfactored embedding)")
        require(self.tie_embeddings or not self.embed_dim, "EMBED_DIM factoring needs TIE_EMBEDDINGS=1")
        require(float(self.mlp_hidden) == self.mlp_mult * self.model_dim,
                f"MLP_MULT*MODEL_DIM={self.mlp_mult * self.model_dim} must be a whole number")
        if self.turbo_quant_train or self.turbo_quant_export:
            size = self.ternary_group_size
            require(self.weight_quant == "ternary" and size & (size - 1) == 0,
                    "TURBO_QUANT_* needs WEIGHT_QUANT=ternary and a power-of-two TERNARY_GROUP_SIZE (the Hadamard block)")
        require(self.resume_from != "auto" or bool(self.run_id or self.checkpoint_dir),
                "RESUME_FROM=auto looks in the run folder LOG_DIR/<RUN_ID>_checkpoints: set RUN_ID (or CHECKPOINT_DIR) "
                "to the run being resumed")
        require(self.sliding_eval_stride <= self.eval_len,
                f"SLIDING_EVAL_STRIDE={self.sliding_eval_stride} must be at most the eval sequence length {self.eval_len}")
        if self.engram_enabled:
            tables = self.engram_num_heads * self.engram_num_orders
            require(self.engram_dim % tables == 0, f"ENGRAM_DIM={self.engram_dim} must divide by ENGRAM_NUM_HEADS*"
                    f"ENGRAM_NUM_ORDERS={tables} (each table holds an equal slice of the memory width)")
            require(self.engram_layer < max(1, self.num_layers // 2),
                    f"ENGRAM_LAYER={self.engram_layer} must be an encoder block, below NUM_LAYERS//2={self.num_layers // 2}")
            require(self.weight_quant != "ternary" or self.engram_dim % self.ternary_group_size == 0,
                    f"ENGRAM_DIM={self.engram_dim} must divide by TERNARY_GROUP_SIZE={self.ternary_group_size} "
                    "(the memory's projections are ternary)")
        require(self.eval_engram_mix == "log" or self.eval_engram_weight <= 1.0,
                f"EVAL_ENGRAM_WEIGHT={self.eval_engram_weight} must be at most 1 with EVAL_ENGRAM_MIX=linear (the "
                "memory's share of the probability)")
        if self.moe_enabled:
            require(self.moe_top_k <= self.moe_num_experts,
                    f"MOE_TOP_K={self.moe_top_k} must be at most MOE_NUM_EXPERTS={self.moe_num_experts}")
            require(self.moe_layer_frac > 0, "MOE_LAYER_FRAC must be above 0 with MOE_ENABLED=1 (the share of layers that route)")
        require(self.xsa_last_n <= self.num_layers, f"XSA_LAST_N={self.xsa_last_n} must be at most NUM_LAYERS={self.num_layers}")
        self._check_skc_relations(require)
        if self.weight_quant == "ternary":
            for label, width in (("MODEL_DIM", self.model_dim), ("MLP_MULT*MODEL_DIM", self.mlp_hidden)):
                require(width % self.ternary_group_size == 0,
                        f"{label}={width} must divide by TERNARY_GROUP_SIZE={self.ternary_group_size} "
                        "(ternary scales are per group of input features)")
        for now, extracted, source in folded_branches(self):
            require(bool(now) == extracted, f"this file was extracted with `{source}` {extracted}; the settings make it "
                    f"{bool(now)}: keep the extracted value, or extract again from train_gpt.py with the changed config")

    def _check_skc_relations(self, require) -> None:
        """The SKC model's settings (issue 9), each checked only while its component is on."""
        require(self.architecture == "hybrid" or not self.skc_layers.strip(),
                f"SKC_LAYERS={self.skc_layers!r} picks the SKC layers of ARCHITECTURE=hybrid (skc uses the SKC mixer in "
                "every layer, transformer in none): set ARCHITECTURE=hybrid or unset SKC_LAYERS")
        if self.architecture == "hybrid":
            mixers = skc_layers(self)
            require(0 < len(mixers) < self.num_layers, f"ARCHITECTURE=hybrid needs SKC and attention layers; SKC_LAYERS="
                    f"{self.skc_layers!r} gives {sorted(mixers)} of {self.num_layers} (ARCHITECTURE=skc: all of them)")
        if self.architecture != "transformer" or self.capsule_enabled:
            require(self.train_seq_len % self.skc_chunk == 0, f"SKC_CHUNK={self.skc_chunk} must divide TRAIN_SEQ_LEN="
                    f"{self.train_seq_len} (a chunk that does not divide pads every training sequence)")
        require(self.architecture != "transformer" or self.skc_spectral_weight == 0,
                "SKC_SPECTRAL_WEIGHT acts on the SKC mixers' decay rates: set ARCHITECTURE=skc or hybrid")
        if self.capsule_enabled:
            require(self.capsule_num >= 1, "CAPSULE_ENABLED=1 needs CAPSULE_NUM >= 1")
            width = self.capsule_num * self.capsule_dim
            require(self.weight_quant != "ternary" or width % self.ternary_group_size == 0,
                    f"CAPSULE_NUM*CAPSULE_DIM={width} must divide by TERNARY_GROUP_SIZE={self.ternary_group_size} "
                    "(the capsule adapter is a ternary layer)")
        require(not self.capsule_carry or (self.capsule_enabled and self.feedback_passes == 0),
                "CAPSULE_CARRY=1 carries the encoder's capsule sums from window to window: it needs CAPSULE_ENABLED=1 "
                "and FEEDBACK_PASSES=0 (a feedback pass summarises the decoder's output, which has no carry)")
        require(self.capsule_carry_decay > 0, "CAPSULE_CARRY_DECAY must be above 0 (1: no decay)")
        require(self.capsule_enabled or not (self.koopman_enabled or self.feedback_passes),
                "KOOPMAN_ENABLED and FEEDBACK_PASSES act on the capsule state: set CAPSULE_ENABLED=1")
        if self.koopman_enabled:
            dim = self.capsule_dim
            require(dim & (dim - 1) == 0, f"KOOPMAN_ENABLED=1 needs a power-of-two CAPSULE_DIM (the Hadamard rotation), "
                    f"got {dim}")
            require(self.koopman_rank <= dim, f"KOOPMAN_RANK={self.koopman_rank} must be at most CAPSULE_DIM={dim}")
        require(self.koopman_consistency_weight == 0 or (self.koopman_enabled and self.feedback_passes > 0),
                "KOOPMAN_CONSISTENCY_WEIGHT trains the Koopman step to predict the next pass's capsule state: it needs "
                "KOOPMAN_ENABLED=1 and FEEDBACK_PASSES >= 1")
        require(not self.adaptive_halt_enabled or self.feedback_passes > 0,
                "ADAPTIVE_HALT_ENABLED=1 halts feedback passes: set FEEDBACK_PASSES >= 1")
        if self.shared_blocks:
            require(self.shared_blocks < self.num_layers,
                    f"SHARED_BLOCKS={self.shared_blocks} must be below NUM_LAYERS={self.num_layers} (0 turns sharing off)")
            require(not (self.xsa_last_n or self.vrl_enabled or self.moe_enabled), "SHARED_BLOCKS shares each layer's "
                    "attention and MLP, which XSA_LAST_N, VRL_ENABLED and MOE_ENABLED choose per layer: use one or the other")
            if self.architecture == "hybrid":
                mixers = skc_layers(self)
                require(all((i in mixers) == (i % self.shared_blocks in mixers) for i in range(self.num_layers)),
                        f"with SHARED_BLOCKS={self.shared_blocks} layer i runs layer i % {self.shared_blocks}'s mixer: "
                        f"SKC_LAYERS={self.skc_layers!r} must repeat with that period")
        if self.recurrence_depth:
            recurrence_band(self)  # a malformed or out-of-range band stops here
        require(self.recurrence_depth > 0 or not self.recurrence_layers.strip(),
                "RECURRENCE_LAYERS needs RECURRENCE_DEPTH >= 1")
        require(not self.moe_enabled or not (self.feedback_passes or self.recurrence_depth),
                "MOE_ENABLED reports router figures per layer and step: FEEDBACK_PASSES and RECURRENCE_DEPTH, which re-run "
                "layers, are not supported with it")

    @property
    def head_dim(self) -> int:
        return self.model_dim // self.num_heads

    @property
    def eval_len(self) -> int:
        return self.eval_seq_len or self.train_seq_len

    @property
    def mlp_hidden(self) -> int:
        return int(self.mlp_mult * self.model_dim)

    def lines(self) -> list[str]:
        return [f"config {name}={getattr(self, name.lower())}" for name in self.SETTINGS]


def layer_indices(text: str, num_layers: int, name: str, band: bool = False) -> tuple[int, ...]:
    """Layer indices from "0,2,5" (band: an inclusive range "lo-hi"), each in [0, num_layers); bad text stops the run."""
    try:
        if band:
            lo, hi = (int(part) for part in text.split("-"))
            indices = tuple(range(lo, hi + 1))
        else:
            indices = tuple(sorted({int(part) for part in text.split(",")}))
        if not indices:
            raise ValueError
    except ValueError:
        form = "an inclusive range lo-hi, e.g. 2-3" if band else "comma-separated layer indices, e.g. 0,2,4"
        raise ConfigError(f"{name}={text!r} must be {form}") from None
    bad = [i for i in indices if not 0 <= i < num_layers]
    if bad:
        raise ConfigError(f"{name}={text!r} names layer {bad[0]}, outside 0..{num_layers - 1} (NUM_LAYERS={num_layers})")
    return indices


def skc_layers(args: Hyperparameters) -> frozenset[int]:
    """Layers whose token mixer is the SKC mixer: every layer (skc), SKC_LAYERS or the even layers (hybrid), none."""
    if args.architecture == "skc":
        return frozenset(range(args.num_layers))
    if args.architecture == "hybrid":
        text = args.skc_layers.strip()
        return frozenset(layer_indices(text, args.num_layers, "SKC_LAYERS") if text else range(0, args.num_layers, 2))
    return frozenset()


def recurrence_band(args: Hyperparameters) -> tuple[int, ...]:
    """The layers depth recurrence re-runs: RECURRENCE_LAYERS, or the two around the U-Net's middle."""
    if args.recurrence_layers.strip():
        return layer_indices(args.recurrence_layers.strip(), args.num_layers, "RECURRENCE_LAYERS", band=True)
    middle = args.num_layers // 2
    return tuple(range(max(middle - 1, 0), min(middle, args.num_layers - 1) + 1))


# -----------------------------------------------------------------------------
# Data: competition shard format
# -----------------------------------------------------------------------------
# A shard is 256 little-endian int32 (magic, version, token count, zeros...)
# followed by `count` little-endian uint16 tokens. Every reader in the project
# (trainer, data tool, bench, tests) goes through read_shard.
SHARD_MAGIC = 20240520
SHARD_VERSION = 1
SHARD_HEADER_INTS = 256
SHARD_HEADER_BYTES = SHARD_HEADER_INTS * 4
BOS_ID = 1  # every document is BOS followed by its tokens (no EOS)


class ShardError(ValueError):
    """A shard file that does not follow the competition format."""


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write a file so that its final name only ever holds complete contents: a temporary name in the same folder,
    fsync, then rename. A failure (full disk, a kill) leaves at most the temporary file, never a partial `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_shard_header(path: str | Path) -> int:
    """Validate a shard's header against its file length; return its token count."""
    path = Path(path)
    if not path.exists():
        raise ShardError(f"shard {path} does not exist")
    if not path.is_file():
        raise ShardError(f"shard {path} is not a file (a folder?): remove it or move it out of DATA_PATH")
    if not os.access(path, os.R_OK):
        raise ShardError(f"shard {path} is not readable by this user")
    size = path.stat().st_size
    if size < SHARD_HEADER_BYTES:
        raise ShardError(f"shard {path} is {size} bytes, shorter than the {SHARD_HEADER_BYTES}-byte header; "
                         "the file is truncated: rebuild it with `python data/prepare.py`")
    header = np.fromfile(path, dtype="<i4", count=SHARD_HEADER_INTS)
    if int(header[0]) != SHARD_MAGIC:
        raise ShardError(f"shard {path} has magic {int(header[0])}, expected {SHARD_MAGIC}: not a competition shard")
    if int(header[1]) != SHARD_VERSION:
        raise ShardError(f"shard {path} has version {int(header[1])}, expected {SHARD_VERSION}")
    count = int(header[2])
    expected = SHARD_HEADER_BYTES + 2 * count
    if count < 0 or size != expected:
        raise ShardError(f"shard {path} header says {count} tokens ({expected} bytes) but the file is {size} bytes; "
                         "the file is truncated or corrupt: rebuild or re-download it")
    return count


def read_shard(path: str | Path) -> np.ndarray:
    """Return a shard's tokens as a uint16 array, after validating the header."""
    count = read_shard_header(path)
    return np.fromfile(path, dtype="<u2", count=count, offset=SHARD_HEADER_BYTES)


def write_shard(path: str | Path, tokens: np.ndarray) -> None:
    """Write tokens (all < 65536) in the competition shard format, atomically."""
    tokens = np.asarray(tokens)
    if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) >= 1 << 16):
        raise ShardError(f"token ids must lie in [0, 65536) to fit uint16; got range [{tokens.min()}, {tokens.max()}]")
    header = np.zeros(SHARD_HEADER_INTS, dtype="<i4")
    header[0], header[1], header[2] = SHARD_MAGIC, SHARD_VERSION, tokens.size
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, header.tobytes() + tokens.astype("<u2", copy=False).tobytes())


def shard_files(data_path: str, split: str) -> list[str]:
    """Sorted paths of a split's shards in DATA_PATH (taken literally: `[` or `*` in it are not patterns)."""
    pattern = os.path.join(glob.escape(data_path), f"fineweb_{split}_*.bin")
    files = sorted(glob.glob(pattern))
    if not files:
        raise ShardError(f"no {split} shards fineweb_{split}_*.bin in DATA_PATH={data_path}: download them with "
                         "`python data/prepare.py download` or build them from local text with `python data/prepare.py build`")
    return files


def shard_headers(data_path: str, split: str) -> tuple[list[str], list[int]]:
    """A split's shard files and their token counts, every header and size checked; a split without tokens fails
    here (an empty training stream would otherwise be waited on forever)."""
    files = shard_files(data_path, split)
    counts = [read_shard_header(path) for path in files]
    if sum(counts) == 0:
        raise ShardError(f"the {split} shards in DATA_PATH={data_path} hold no tokens ({len(files)} files of 0 "
                         "tokens): rebuild them with `python data/prepare.py build` or re-download them")
    return files, counts


def check_token_ranges(files: list[str], counts: list[int], vocab_size: int, rt: Runtime) -> None:
    """Every token id below the vocabulary size: a vectorised max per shard, each rank scanning its share and one
    all-reduce sharing the maxima, so that a bad shard stops the run before step 1, not when training reaches it."""
    largest = torch.zeros(len(files), dtype=torch.float64, device=rt.device)
    for index in range(rt.rank, len(files), rt.world_size):
        if counts[index]:
            tokens = np.memmap(files[index], dtype="<u2", mode="r", offset=SHARD_HEADER_BYTES, shape=(counts[index],))
            largest[index] = float(tokens.max())
    for path, top in zip(files, rt.all_reduce(largest, op=dist.ReduceOp.MAX).tolist()):
        if top >= vocab_size:
            raise ShardError(f"shard {path} holds token id {int(top)} >= the tokenizer's vocabulary of {vocab_size}: "
                             "the shards and TOKENIZER_PATH do not match")


class TokenStream:
    """Tokens of a list of shards, read in order and wrapping around; ids >= vocab_size raise."""

    def __init__(self, files: list[str], vocab_size: int):
        self.files = files
        self.vocab_size = vocab_size
        self.file_index = -1
        self.tokens = np.zeros(0, dtype=np.uint16)
        self.pos = 0

    def _next_file(self) -> None:
        for _ in self.files:  # skip empty shards, but never loop forever over shards that are all empty
            self.file_index = (self.file_index + 1) % len(self.files)
            path = self.files[self.file_index]
            self.tokens = read_shard(path)
            self.pos = 0
            if self.tokens.size:
                break
        else:
            raise ShardError(f"the shards {self.files[0]} ... hold no tokens")
        if int(self.tokens.max()) >= self.vocab_size:
            raise ShardError(f"shard {path} holds token id {int(self.tokens.max())} >= VOCAB_SIZE={self.vocab_size}: "
                             "the shards and the tokenizer do not match")

    def position(self) -> tuple[int, int]:
        """(shard index, token offset) of the next token; (-1, 0) before the first read."""
        return self.file_index, self.pos

    def seek(self, file_index: int, pos: int) -> None:
        """Continue from a position() of a stream over the same shards."""
        if not -1 <= file_index < len(self.files):
            raise ShardError(f"shard index {file_index} is out of range: there are {len(self.files)} shards now")
        self.file_index, self.tokens, self.pos = file_index - 1, np.zeros(0, dtype=np.uint16), 0
        if file_index >= 0:
            self._next_file()
        if not 0 <= pos <= self.tokens.size:
            raise ShardError(f"offset {pos} lies beyond the {self.tokens.size} tokens of shard {self.files[file_index]}")
        self.pos = pos

    def take(self, n: int) -> np.ndarray:
        parts, left = [], n
        while left > 0:
            if self.pos >= self.tokens.size:
                self._next_file()
            k = min(left, self.tokens.size - self.pos)
            parts.append(self.tokens[self.pos:self.pos + k])
            self.pos += k
            left -= k
        return np.concatenate(parts)


class DistributedTokenLoader:
    """Every rank draws the same global span of the stream and keeps its own contiguous slice,
    so a global batch holds the same sequences on 1 or N processes.

    On CUDA the next batch is prepared while the current one computes: its slice is pinned and copied on a
    side stream, so the host-to-device transfer never waits in the compute stream. The token stream is then
    one batch ahead of what next_batch has returned.
    """

    def __init__(self, data_path: str, vocab_size: int, rank: int, world_size: int, device: torch.device):
        self.stream = TokenStream(shard_files(data_path, "train"), vocab_size)
        self.rank, self.world_size, self.device = rank, world_size, device
        self.copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.prefetched: tuple[int, Tensor] | None = None  # (local tokens, its span on the device)
        self.prefetch_start: tuple[int, int] | None = None  # the stream position the prefetched span came from

    def _local_span(self, local_tokens: int) -> Tensor:
        # One global span of world*local+1 tokens, cut the same way for any world size: rank r's
        # inputs are span[r*local:(r+1)*local], its targets the same range shifted by one.
        chunk = self.stream.take(self.world_size * local_tokens + 1)
        start = self.rank * local_tokens
        local = torch.from_numpy(chunk[start:start + local_tokens + 1].astype(np.int64))
        if self.copy_stream is None:
            return local
        with torch.cuda.stream(self.copy_stream):
            return local.pin_memory().to(self.device, non_blocking=True)

    def next_batch(self, local_tokens: int, seq_len: int) -> tuple[Tensor, Tensor]:
        if self.copy_stream is None:
            local = self._local_span(local_tokens)
        else:
            if self.prefetched is None:
                self.prefetched = (local_tokens, self._local_span(local_tokens))
            size, local = self.prefetched
            if size != local_tokens:
                raise RuntimeError(f"next_batch({local_tokens}) after a prefetch of {size} tokens: one loader serves "
                                   "one batch size")
            compute = torch.cuda.current_stream(self.device)
            compute.wait_stream(self.copy_stream)
            local.record_stream(compute)  # the copy stream's allocation is used, then freed, on the compute stream
            self.prefetch_start = self.stream.position()
            self.prefetched = (local_tokens, self._local_span(local_tokens))
        return local[:-1].view(-1, seq_len), local[1:].view(-1, seq_len)

    def position(self) -> tuple[int, int]:
        """Where the next batch that next_batch returns starts (behind the stream by a prefetched batch)."""
        return self.prefetch_start if self.prefetched is not None else self.stream.position()

    def seek(self, file_index: int, pos: int) -> None:
        """Continue from a position(); a prefetched batch is dropped and read again from there."""
        self.prefetched = self.prefetch_start = None
        self.stream.seek(file_index, pos)


# -----------------------------------------------------------------------------
# Tokenizer and bits per byte (the score)
# -----------------------------------------------------------------------------
# Byte accounting follows the official script: control, unknown and unused ids
# are boundaries worth 0 bytes; byte-fallback pieces are 1 byte; a piece that
# starts with "▁" carries a leading space, which counts only when the previous
# token is not a boundary.
class ByteTables(NamedTuple):
    base_bytes: Tensor  # int16 [vocab]
    has_leading_space: Tensor  # bool [vocab]
    is_boundary: Tensor  # bool [vocab]

    def target_bytes(self, prev_ids: Tensor, target_ids: Tensor) -> Tensor:
        extra = self.has_leading_space[target_ids] & ~self.is_boundary[prev_ids]
        return self.base_bytes[target_ids].to(torch.int32) + extra.to(torch.int32)


def build_byte_tables(sp, vocab_size: int, device: torch.device) -> ByteTables:
    table_size = max(int(sp.vocab_size()), vocab_size)
    base_bytes = np.zeros(table_size, dtype=np.int16)
    has_leading_space = np.zeros(table_size, dtype=np.bool_)
    is_boundary = np.ones(table_size, dtype=np.bool_)
    for token_id in range(int(sp.vocab_size())):
        if sp.is_control(token_id) or sp.is_unknown(token_id) or sp.is_unused(token_id):
            continue
        is_boundary[token_id] = False
        if sp.is_byte(token_id):
            base_bytes[token_id] = 1
            continue
        piece = sp.id_to_piece(token_id)
        if piece.startswith("\u2581"):
            has_leading_space[token_id] = True
            piece = piece[1:]
        base_bytes[token_id] = len(piece.encode("utf-8"))
    return ByteTables(torch.from_numpy(base_bytes).to(device), torch.from_numpy(has_leading_space).to(device),
                      torch.from_numpy(is_boundary).to(device))


def load_tokenizer(path: str):
    import sentencepiece as spm
    if not Path(path).is_file():
        raise FileNotFoundError(f"tokenizer {path} not found: set TOKENIZER_PATH, or get one with "
                                "`python data/prepare.py download` / `python data/prepare.py build`")
    try:
        sp = spm.SentencePieceProcessor(model_file=path)
    except (RuntimeError, OSError) as error:
        raise ConfigError(f"TOKENIZER_PATH={path} is not a SentencePiece model ({str(error).strip()[:200]}): point it "
                          "at the .model file the shards were built with") from None
    if sp.vocab_size() <= BOS_ID:
        raise ConfigError(f"TOKENIZER_PATH={path} has {sp.vocab_size()} pieces: not a usable tokenizer")
    return sp


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_dataset_manifest(args: Hyperparameters, vocab_size: int) -> None:
    """Where DATA_PATH holds the manifest.json that `data/prepare.py` writes, the tokenizer must be the one the
    shards were encoded with: same vocabulary size and same file (sha256). Ids of another tokenizer of the same size
    are all in range, so nothing else would notice, and the score would be plausible and wrong."""
    path = Path(args.data_path) / "manifest.json"
    if not path.is_file():
        return
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        built_vocab, built_sha = manifest.get("vocab_size"), manifest.get("tokenizer_sha256")
    except (ValueError, AttributeError) as error:
        raise ShardError(f"{path} is not a data manifest ({error}): rebuild the data set or remove the file") from None
    source = f"the shards in DATA_PATH={args.data_path} were encoded with {manifest.get('tokenizer_path')}"
    if built_vocab is not None and built_vocab != vocab_size:
        raise ConfigError(f"{source} ({built_vocab} tokens, says {path.name}) but TOKENIZER_PATH={args.tokenizer_path} "
                          f"has {vocab_size}: point TOKENIZER_PATH at the tokenizer the shards were built with")
    if built_sha is not None and built_sha != sha256_file(args.tokenizer_path):
        raise ConfigError(f"{source} (sha256 {built_sha[:12]}..., says {path.name}) but TOKENIZER_PATH="
                          f"{args.tokenizer_path} is a different file: point TOKENIZER_PATH at the tokenizer the shards "
                          "were built with")


def check_tokenizer_spec(args: Hyperparameters, vocab_size: int) -> None:
    """Where tokenizer_specs.json sits beside this file, a tokenizer or dataset it names must have its vocab size
    (a 1024-vocab dataset read with an 8192-vocab tokenizer scores garbage without failing)."""
    specs = Path(__file__).with_name("tokenizer_specs.json")
    if not specs.is_file():
        return
    for spec in json.loads(specs.read_text())["tokenizers"]:
        for label, value, named in (("TOKENIZER_PATH", Path(args.tokenizer_path).name, spec["tokenizer_filename"]),
                                    ("DATA_PATH", Path(args.data_path).name, f"fineweb10B_{spec['dataset_suffix']}")):
            if value == named and spec["vocab_size"] != vocab_size:
                raise ConfigError(f"{label}={value} is the {spec['name']} variant ({spec['vocab_size']} tokens) but the "
                                  f"tokenizer has {vocab_size}: point DATA_PATH and TOKENIZER_PATH at the same variant")


def load_validation_tokens(data_path: str, seq_len: int, vocab_size: int, max_tokens: int = 0,
                           eval_len: int = 0) -> np.ndarray:
    """The validation stream, cut to whole sequences plus one token (as the official script does). It must hold
    one training sequence and one evaluation window (eval_len), which scoring reads in full."""
    tokens = np.concatenate([read_shard(f) for f in shard_files(data_path, "val")])
    if max_tokens:
        tokens = tokens[:max_tokens + 1]
    usable = (tokens.size - 1) // seq_len * seq_len
    if usable < max(seq_len, eval_len):
        cut = f"VAL_MAX_TOKENS={max_tokens} leaves" if max_tokens else f"the validation split in DATA_PATH={data_path} has"
        raise ShardError(f"{cut} {usable} whole-sequence targets, fewer than one training sequence of {seq_len} "
                         f"and one evaluation window of {max(eval_len, seq_len)}: raise VAL_MAX_TOKENS or lower "
                         "EVAL_SEQ_LEN")
    if int(tokens.max()) >= vocab_size:
        raise ShardError(f"the validation split in DATA_PATH={data_path} holds token id {int(tokens.max())} >= "
                         f"VOCAB_SIZE={vocab_size}")
    return tokens[:usable + 1]


# -----------------------------------------------------------------------------
# Quantization primitives
# -----------------------------------------------------------------------------
# The training forward and the exporter share these functions, so what the
# model learned with (straight-through estimator) is exactly what is stored.
FP8_MAX = 448.0  # largest finite float8 e4m3fn
FP4_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # magnitudes of float4 e2m1


def fp8_encode(x: Tensor, scale: Tensor) -> Tensor:
    return (x / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def fp8_decode(codes: Tensor, scale: Tensor) -> Tensor:
    return codes.to(torch.float32) * scale


def fp4_encode(x: Tensor, scale: Tensor) -> Tensor:
    """uint8 codes: bit 3 is the sign, bits 0-2 index FP4_GRID (nearest magnitude)."""
    grid = torch.tensor(FP4_GRID, device=x.device)
    magnitude = (x / scale).abs().clamp_max(FP4_GRID[-1])
    index = (magnitude.unsqueeze(-1) - grid).abs().argmin(-1)
    return (index | ((x < 0).to(torch.int64) << 3)).to(torch.uint8)


def fp4_decode(codes: Tensor, scale: Tensor) -> Tensor:
    grid = torch.tensor(FP4_GRID, device=codes.device)
    sign = 1.0 - 2.0 * ((codes >> 3) & 1).to(torch.float32)
    return sign * grid[(codes & 7).long()] * scale


FP16_TINIEST = 2.0 ** -24  # the smallest positive fp16 value: a stored scale never rounds to zero


def fp16_scale(scale: Tensor) -> Tensor:
    """A per-row scale as stored (fp16), never zero, so an all-zero row encodes to zeros instead of 0/0."""
    return scale.to(torch.float16).float().clamp_min(FP16_TINIEST)


def fp_row_scale(w: Tensor, fmt: str, clip: float = 1.0) -> Tensor:
    """Per-row scale that maps the row's (clipped) absolute maximum onto the format's largest value."""
    top = FP8_MAX if fmt == "fp8" else FP4_GRID[-1]
    return fp16_scale(w.abs().amax(dim=-1, keepdim=True).float() * clip / top)


def straight_through(w: Tensor, q: Tensor) -> Tensor:
    """Exactly q in the forward (w - w.detach() is exactly 0), with w's gradient passed through unchanged."""
    return q.to(w.dtype) + (w - w.detach())


def fp_fake_quant(w: Tensor, fmt: str) -> Tensor:
    """Round-trip w through fp8/fp4 storage, exactly as export stores it; the gradient passes straight through."""
    scale = fp_row_scale(w.detach(), fmt)
    q = fp8_decode(fp8_encode(w.detach(), scale), scale) if fmt == "fp8" else fp4_decode(fp4_encode(w.detach(), scale), scale)
    return straight_through(w, q)


def fp8_scale_factor(scales: Tensor) -> Tensor:
    """Power-of-two per-tensor factor for fp8 scales: dividing by it is exact, so re-encoding stored scales
    reproduces them bit for bit."""
    return torch.exp2(torch.ceil(torch.log2(scales.amax().clamp_min(1e-30) / FP8_MAX)))


def round_scale(scale: Tensor, fmt: str) -> Tensor:
    """Per-group ternary scales as they will be stored: fp16, or fp8 times a power-of-two per-tensor factor."""
    if fmt == "fp16":
        return scale.clamp(6.2e-5, 65504.0).to(torch.float16).float()
    factor = fp8_scale_factor(scale)
    return fp8_decode(fp8_encode(scale, factor), factor).clamp_min(2.0 ** -9 * factor)


def ternary_ratios(w: Tensor, group_size: int, scale_format: str, scale_mult: float | Tensor = 1.0,
                   fixed_scales: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(w per group over its group's absmean [out, in/group, group], per-group scales as stored [out, in/group]).
    Scales are the absmean times `scale_mult`, rounded to their storage format, unless fixed_scales (a loaded
    artifact's exact scales) are given; then the ratios are taken against those."""
    groups = w.detach().float().reshape(w.shape[0], -1, group_size)
    if fixed_scales is None:
        reference = groups.abs().mean(-1).clamp_min(1e-8)
        scales = round_scale(reference * scale_mult, scale_format)
    else:
        reference = scales = fixed_scales
    return groups / reference.unsqueeze(-1), scales


def ternary_quantize(w: Tensor, group_size: int, scale_format: str, threshold: float | Tensor = 0.5,
                     scale_mult: float | Tensor = 1.0, fixed_scales: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """BitNet b1.58: trits (int8 {-1,0,1}) and per-group scales [out, in/group] as stored.
    A weight becomes +-1 where |w| exceeds `threshold` times its group's absmean (0.5 is plain rounding)."""
    ratio, scales = ternary_ratios(w, group_size, scale_format, scale_mult, fixed_scales)
    trits = (ratio > threshold).to(torch.int8) - (ratio < -threshold).to(torch.int8)
    return trits.reshape(w.shape), scales


def ternary_weight(w: Tensor, group_size: int, scale_format: str, threshold: float | Tensor = 0.5,
                   scale_mult: float | Tensor = 1.0, fixed_scales: Tensor | None = None) -> Tensor:
    """ternary_dequantize(*ternary_quantize(...)), bit for bit, without the int8 trits in between:
    each weight is exactly +scale, -scale or 0 (the forward's fast path)."""
    ratio, scales = ternary_ratios(w, group_size, scale_format, scale_mult, fixed_scales)
    scale = scales.unsqueeze(-1)
    return torch.where(ratio > threshold, scale, torch.where(ratio < -threshold, -scale, 0.0)).reshape(w.shape)


def ternary_dequantize(trits: Tensor, scales: Tensor, group_size: int) -> Tensor:
    groups = trits.float().reshape(trits.shape[0], -1, group_size)
    return (groups * scales.unsqueeze(-1)).reshape(trits.shape)


# -----------------------------------------------------------------------------
# Model: ternary U-Net GPT
# -----------------------------------------------------------------------------
# Parameter roles. Every parameter has exactly one role, declared by the module
# that owns it (its `param_roles`: local name -> role) and resolved once by
# parameter_roles(). The role alone decides how a parameter is treated: its
# optimizer group (the role's name), whether export may quantize it, what
# test-time training may move, and where the parameter count files it.
class Role(NamedTuple):
    quantizable: bool  # export may store it in a low-bit format (else fp16)
    ttt_scope: str  # "scalars": trained by every TTT scope; "all": only by TTT_SCOPE=all; "frozen": never
    count_kind: str  # its line in the parameter count ("matrix": ternary or fp_matrix by layer)


ROLES = {
    "embed": Role(quantizable=True, ttt_scope="all", count_kind="embedding"),  # Adam, embedding LR
    "head": Role(quantizable=True, ttt_scope="all", count_kind="embedding"),  # Adam, head LR
    "matrix": Role(quantizable=True, ttt_scope="all", count_kind="matrix"),  # Muon
    # Gates, routers, scales and mixing scalars of any shape: Adam without weight decay (decay would
    # silently drive a gate to zero), kept in fp16 by export.
    "scalar": Role(quantizable=False, ttt_scope="scalars", count_kind="scalar"),
    # Hashed n-gram tables (EngramHash): Adam at ENGRAM_LR, quantized by export, never moved by test-time
    # training (the tables stay exactly as the artifact packs them).
    "hash_table": Role(quantizable=True, ttt_scope="frozen", count_kind="hash_table"),
    # Koopman dynamics (D + UV^T on the capsule state): Adam at KOOPMAN_LR without weight decay, fp16 in the
    # artifact, clamped to a contraction after every optimizer step; test-time training, which has no clamp,
    # never moves it.
    "koopman": Role(quantizable=False, ttt_scope="frozen", count_kind="scalar"),
}


def parameter_roles(model: nn.Module) -> dict[str, str]:
    """Every trainable tensor's role by parameter name; a parameter without a declared role is an error."""
    roles: dict[str, str] = {}
    seen: set[int] = set()
    for prefix, module in model.named_modules():
        declared = getattr(module, "param_roles", {})
        for local, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            name = f"{prefix}.{local}" if prefix else local
            if declared.get(local) not in ROLES:
                raise TypeError(f"parameter {name} has no role: declare it in {type(module).__name__}.param_roles "
                                f"as one of {', '.join(ROLES)}")
            roles[name] = declared[local]
    return roles


# --- feature: int8_zlib (EXPORT_FORMAT=int8_zlib) ---
INT8_FP16_MAX_NUMEL = 65536  # the baseline's int8 + zlib export keeps tensors this small in fp16
# --- end feature: int8_zlib ---


def fp_protected(name: str, args: Hyperparameters) -> bool:
    return any(part and part in name for part in args.export_fp16_patterns.split(","))


def storage_format(name: str, role: str | None, numel: int, args: Hyperparameters) -> str:
    """How export stores a tensor that is not a ternary layer's weight: fp16, int8, fp8 or fp4 (`role` None: a
    buffer). The model's forward round-trips every fp8/fp4 one through its format while training
    (GPT.simulate_storage), so the artifact holds what was trained; int8 (the baseline's export) stays post-hoc."""
    if args.fp_storage_sim != "none" and role == "embed":
        return args.fp_storage_sim
    if (role is None or not ROLES[role].quantizable or fp_protected(name, args)
            or (args.export_format == "int8_zlib" and numel <= INT8_FP16_MAX_NUMEL)):
        return "fp16"
    return "int8" if args.export_format == "int8_zlib" else args.export_fp_format


def with_roles(module: nn.Module, **roles: str) -> nn.Module:
    """`module` with the roles of its own parameters declared (for library modules such as nn.Embedding)."""
    module.param_roles = roles
    return module


class TernaryLinear(nn.Linear):
    """BitNet b1.58 linear layer: {-1, 0, +1} x per-group absmean scale, trained through an fp shadow weight.

    The buffers hold what calibration chose (threshold, scale multiplier) and, in a model loaded from an
    artifact, the exact stored scales; the exporter reads trits and scales through quantized(), so the
    artifact holds exactly what the forward used.
    """

    param_roles = {"weight": "matrix"}

    def __init__(self, in_features: int, out_features: int, group_size: int, scale_format: str):
        super().__init__(in_features, out_features, bias=False)
        self.group_size, self.scale_format = group_size, scale_format
        self.register_buffer("threshold", torch.tensor(0.5), persistent=False)
        self.register_buffer("scale_mult", torch.tensor(1.0), persistent=False)
        self.register_buffer("fixed_scales", None, persistent=False)
        self._quantized_cache: tuple[tuple, Tensor] | None = None  # (versions of its inputs, quantized_weight)

    def quantized(self, weight: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Trits and scales of `weight` (default: this layer's) under this layer's quantization settings."""
        return ternary_quantize(self.weight if weight is None else weight, self.group_size, self.scale_format,
                                self.threshold, self.scale_mult, self.fixed_scales)

    def quantized_weight(self) -> Tensor:
        """The dequantized weight the forward computes with (exactly what export stores). Eagerly it is recomputed
        only when the weight or a quantization buffer changed (every in-place update bumps a tensor's version),
        so gradient-accumulation micro-steps, evaluation batches and calibration probes share one quantization;
        under torch.compile it is part of the compiled graph instead."""
        settings = (self.group_size, self.scale_format, self.threshold, self.scale_mult, self.fixed_scales)
        if torch.compiler.is_compiling():
            return ternary_weight(self.weight, *settings)
        key = tuple((t._version, t.data_ptr()) if t is not None else None
                    for t in (self.weight, self.threshold, self.scale_mult, self.fixed_scales))
        if self._quantized_cache is None or self._quantized_cache[0] != key:
            self._quantized_cache = (key, ternary_weight(self.weight, *settings))
        return self._quantized_cache[1]

    def forward(self, x: Tensor) -> Tensor:
        w = straight_through(self.weight, self.quantized_weight())
        return F.linear(x, w.to(x.dtype))


def hadamard_matrix(n: int) -> Tensor:
    """Orthonormal Sylvester Hadamard matrix (n a power of two); symmetric, so it is its own inverse.
    (TurboQuant and the Koopman dynamics use it.)"""
    h = torch.ones(1, 1)
    while h.size(0) < n:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return h / math.sqrt(n)


# --- feature: turbo_quant (TURBO_QUANT_TRAIN, TURBO_QUANT_EXPORT) ---
def rotate_blocks(x: Tensor, hadamard: Tensor) -> Tensor:
    """Multiply each block of the last dim by the Hadamard matrix (TurboQuant's rotation)."""
    n = hadamard.size(0)
    return (x.reshape(*x.shape[:-1], -1, n) @ hadamard.to(x.dtype)).reshape(x.shape)


class RotatedTernaryLinear(TernaryLinear):
    """TurboQuant: inputs pass through a blockwise Hadamard rotation, so the ternary weight lives in the rotated basis."""

    def __init__(self, in_features: int, out_features: int, group_size: int, scale_format: str):
        super().__init__(in_features, out_features, group_size, scale_format)
        self.register_buffer("hadamard", hadamard_matrix(group_size), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(rotate_blocks(x, self.hadamard))
# --- end feature: turbo_quant ---


class CastedLinear(nn.Linear):
    """Full-precision linear layer kept in fp32 and cast to the activation dtype (the baseline's layer)."""

    def __init__(self, in_features: int, out_features: int, role: str = "matrix"):
        super().__init__(in_features, out_features, bias=False)
        self.param_roles = {"weight": role}
        self.storage_format: str | None = None  # fp8/fp4: the forward uses the weight as export stores it

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight if self.storage_format is None else fp_fake_quant(self.weight, self.storage_format)
        return F.linear(x, w.to(x.dtype))


def make_linear(args: Hyperparameters, in_features: int, out_features: int) -> nn.Linear:
    if args.weight_quant == "ternary":
        layer = RotatedTernaryLinear if args.turbo_quant_train else TernaryLinear
        return layer(in_features, out_features, args.ternary_group_size, args.ternary_scale_format)
    return CastedLinear(in_features, out_features)


def rms_norm(x: Tensor) -> Tensor:
    return F.rms_norm(x, (x.size(-1),))


class Rotary(nn.Module):
    """RoPE on the first `rope_dims` dims of each head (partial RoPE); the rest carry no position."""

    def __init__(self, rope_dims: int, base: float):
        super().__init__()
        self.rope_dims = rope_dims
        self.register_buffer("inv_freq", 1.0 / base ** (torch.arange(0, rope_dims, 2).float() / rope_dims), persistent=False)
        self._cache: tuple[int, torch.device, Tensor, Tensor] | None = None

    def tables(self, seq_len: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """cos and sin, [seq_len, rope_dims / 2]."""
        freqs = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), self.inv_freq.to(device))
        return freqs.cos(), freqs.sin()

    def cos_sin(self, seq_len: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """Cached per length and device eagerly; computed in the graph under torch.compile, where filling the
        cache would change what the graph was guarded on and recompile it on the next call."""
        if torch.compiler.is_compiling():
            return self.tables(seq_len, device)
        if self._cache is None or self._cache[0] != seq_len or self._cache[1] != device:
            self._cache = (seq_len, device, *self.tables(seq_len, device))
        return self._cache[2], self._cache[3]

    def forward(self, x: Tensor, heads_first: bool) -> Tensor:
        """x: [B, H, T, D] when heads_first (SDPA's layout), else [B, T, H, D] (the flash kernels')."""
        cos, sin = self.cos_sin(x.size(2) if heads_first else x.size(1), x.device)
        if not heads_first:
            cos, sin = cos[:, None], sin[:, None]
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        if self.rope_dims < x.size(-1):
            return torch.cat((self.rotate(x[..., :self.rope_dims], cos, sin), x[..., self.rope_dims:]), dim=-1)
        return self.rotate(x, cos, sin)  # (slicing out all of x would cost a copy in the backward)

    @staticmethod
    def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        half = x.size(-1) // 2
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1)


def select_attention_backend(requested: str, device: torch.device) -> tuple[str, object]:
    """FA3 -> FA2 -> SDPA, the first one that is available (flash kernels need CUDA)."""
    candidates = ("fa3", "fa2", "sdpa") if requested == "auto" else (requested,)
    for name in candidates:
        if name == "sdpa":
            return name, None
        if device.type != "cuda":
            continue
        try:
            if name == "fa3":
                from flash_attn_interface import flash_attn_func
            else:
                from flash_attn import flash_attn_func
            return name, flash_attn_func
        except ImportError:
            continue
    raise RuntimeError(f"ATTN_BACKEND={requested} is not available on {device.type}; use ATTN_BACKEND=auto or sdpa")


class CausalSelfAttention(nn.Module):
    param_roles = {"q_gain": "scalar", "vrl_gate": "scalar"}

    def __init__(self, args: Hyperparameters, layer: int):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = args.num_heads, args.num_kv_heads, args.head_dim
        kv_dim = self.num_kv_heads * self.head_dim
        self.c_q = make_linear(args, args.model_dim, args.model_dim)
        self.c_k = make_linear(args, args.model_dim, kv_dim)
        self.c_v = make_linear(args, args.model_dim, kv_dim)
        self.proj = make_linear(args, args.model_dim, args.model_dim)
        self.qk_norm = args.qk_norm
        self.q_gain = nn.Parameter(torch.full((self.num_heads,), args.qk_gain_init))
        self.rotary = Rotary(args.rope_dims or self.head_dim, args.rope_base)
        self.backend, self.flash_fn = "sdpa", None
        self.args = args  # the forward's feature guards read settings (so `extract --dce` can fold them)
        self.xsa = layer >= args.num_layers - args.xsa_last_n
        self.vrl_source, self.vrl_gate = False, None
        if args.vrl_enabled and vrl_active(args):
            self.vrl_source = layer == 0
            # sigmoid(4) = 0.98 of the layer's own values at the start
            self.vrl_gate = nn.Parameter(torch.tensor(4.0)) if layer > 0 else None

    def forward(self, x: Tensor, ctx: ForwardContext) -> Tensor:
        B, T, _ = x.shape
        q = self.c_q(x).view(B, T, self.num_heads, self.head_dim)
        k = self.c_k(x).view(B, T, self.num_kv_heads, self.head_dim)
        v = self.c_v(x).view(B, T, self.num_kv_heads, self.head_dim)
        if self.args.vrl_enabled:
            if self.vrl_source:
                ctx.values0 = v
            if self.vrl_gate is not None:
                v = value_residual(v, ctx.values0, self.vrl_gate)
        # The flash kernels take [B, T, H, D]; SDPA takes [B, H, T, D], and q and k normed and rotated in that layout
        # reach it contiguous, which makes its backward faster on the CPU than through transposed views.
        heads_first = self.flash_fn is None
        if heads_first:
            q, k = q.transpose(1, 2), k.transpose(1, 2)
        if self.qk_norm:
            q, k = rms_norm(q), rms_norm(k)
        gain = self.q_gain.to(q.dtype)
        q = self.rotary(q, heads_first) * (gain[:, None, None] if heads_first else gain[:, None])
        k = self.rotary(k, heads_first)
        if self.flash_fn is not None:
            y = self.flash_fn(q, k, v, causal=True)
            y = y[0] if isinstance(y, tuple) else y
        else:
            y = F.scaled_dot_product_attention(q, k, v.transpose(1, 2), is_causal=True,
                                               enable_gqa=self.num_kv_heads != self.num_heads).transpose(1, 2)
        if self.args.xsa_last_n and self.xsa:
            y = exclude_self_value(y, v)
        return self.proj(y.reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, args: Hyperparameters):
        super().__init__()
        self.fc = make_linear(args, args.model_dim, args.mlp_hidden)
        self.proj = make_linear(args, args.mlp_hidden, args.model_dim)
        self.negative_slope = 0.5 if args.mlp_act == "leaky_relu2" else 0.0

    def forward(self, x: Tensor, ctx: ForwardContext | None = None) -> Tensor:
        """ctx is unused here; the TernaryMoE that takes an MLP's place records its router figures in it."""
        h = self.fc(x)
        h = F.leaky_relu(h, self.negative_slope) if self.negative_slope else F.relu(h)
        return self.proj(h.square())


class ForwardContext:
    """What one forward pass carries between layers: created per call and dropped after it, never stored on a
    module (auxiliary losses on modules would leak across calls, ranks and compiled graphs)."""

    def __init__(self):
        self.values0: Tensor | None = None  # layer 0's attention values (VRL)
        self.doc_starts: Tensor | None = None  # [B, T] most recent BOS at or before each position (SKC, capsules)
        self.aux_losses: list[Tensor] = []  # weighted terms of the training objective, never of the reported loss
        self.router_stats: list[Tensor] = []  # one ROUTER_STATS row per routing layer (MoE)
        self.capsule_carry = None  # evaluation with CAPSULE_CARRY: the batch's carried capsule sums (CapsuleCarry)


def document_starts(input_ids: Tensor) -> Tensor:
    """[B, T] index of the most recent BOS at or before each position (0 when the window holds none): the first
    position a document-local state may read. EngramHash keys, scan, convolution and capsule state stop there."""
    positions = torch.arange(input_ids.size(1), device=input_ids.device).expand_as(input_ids)
    return torch.cummax(torch.where(input_ids == BOS_ID, positions, torch.zeros_like(positions)), dim=1).values


class ModelAux(NamedTuple):
    loss: Tensor  # the sum of the auxiliary objective terms (0 without any)
    router_stats: Tensor | None  # [routing layers, ROUTER_STATS width], detached


# --- feature: xsa (XSA_LAST_N) ---
def exclude_self_value(y: Tensor, v: Tensor) -> Tensor:
    """XSA: each head's output minus its projection on the token's own value (y, v: [B, T, heads|kv heads, D])."""
    v = v.repeat_interleave(y.size(2) // v.size(2), dim=2)
    along = (y * v).sum(-1, keepdim=True) / v.square().sum(-1, keepdim=True).clamp_min(1e-6)
    return y - along * v
# --- end feature: xsa ---


# --- feature: vrl (VRL_ENABLED) ---
def vrl_active(args: Hyperparameters) -> bool:
    """Value residual needs attention in layer 0, whose values every later layer blends in."""
    if args.architecture != "transformer":
        return args.vrl_enabled and 0 not in skc_layers(args)
    return args.vrl_enabled


def value_residual(v: Tensor, values0: Tensor, gate_logit: Tensor) -> Tensor:
    gate = torch.sigmoid(gate_logit).to(v.dtype)
    return gate * v + (1.0 - gate) * values0
# --- end feature: vrl ---


# --- feature: ln_scale_damping (LN_SCALE_DAMPING) ---
def ln_scale_factor(layer: int) -> float:
    """Deeper blocks read their normed inputs scaled by 1/sqrt(layer + 1) (the frontier records' "LN scale")."""
    return 1.0 / math.sqrt(layer + 1)
# --- end feature: ln_scale_damping ---


# --- feature: smear_gate (SMEAR_GATE) ---
class SmearGate(nn.Module):
    """Blend the previous token's embedding into each position through a learned per-channel gate. At a BOS the
    previous token belongs to another document, so the position keeps its own embedding."""
    param_roles = {"gate": "scalar"}

    def __init__(self, dim: int):
        super().__init__()
        self.gate = nn.Parameter(torch.zeros(dim))  # sigmoid(0): an even blend at the start

    def forward(self, x: Tensor, input_ids: Tensor) -> Tensor:
        previous = torch.cat((x[:, :1], x[:, :-1]), dim=1)  # the window's first position has no previous token
        previous = torch.where((input_ids == BOS_ID).unsqueeze(-1), x, previous)
        gate = torch.sigmoid(self.gate).to(x.dtype)
        return (1.0 - gate) * x + gate * previous
# --- end feature: smear_gate ---


# --- feature: engram_hash (ENGRAM_ENABLED) ---
def distinct_primes(count: int, start: int = 100_003) -> list[int]:
    """The first `count` primes from `start` on: one multiplier per hash table, so tables collide differently."""
    primes, candidate = [], start
    while len(primes) < count:
        if all(candidate % d for d in range(2, int(candidate ** 0.5) + 1)):
            primes.append(candidate)
        candidate += 1
    return primes


def shift_right(ids: Tensor, by: int) -> Tensor:
    """ids[:, t - by] at position t (zero where t < by; those keys are masked)."""
    return F.pad(ids, (by, 0))[:, :ids.size(1)] if by else ids


class EngramHash(nn.Module):
    """Hashed n-gram memory added to the hidden state at the input of encoder block ENGRAM_LAYER.

    For each order n (2 .. ENGRAM_NUM_ORDERS+1) and each of ENGRAM_NUM_HEADS hash functions, the n tokens ending at
    position t are hashed (Horner's rule with a distinct prime, modulo ENGRAM_BUCKETS) into a table row; the rows
    are concatenated and projected to the model width. A key that would read a token before the most recent BOS
    (or before the window) is masked to zero, so nothing crosses a document boundary. A context gate
    sigmoid(scale * cos(RMSNorm(h), RMSNorm(key))) with scale = min(softplus(raw) + 0.1, 4) weighs the memory
    against the hidden state h; the bound keeps the gate from collapsing or saturating.
    With one head and one order this is the classic BigramHash.
    """
    param_roles = {"table": "hash_table", "gate_scale": "scalar"}

    def __init__(self, args: Hyperparameters):
        super().__init__()
        self.num_heads, self.num_orders, self.buckets = args.engram_num_heads, args.engram_num_orders, args.engram_buckets
        num_tables = self.num_heads * self.num_orders
        self.table = nn.Parameter(torch.randn(num_tables * self.buckets, args.engram_dim // num_tables) * 0.02)
        primes = torch.tensor(distinct_primes(num_tables), dtype=torch.int64).view(self.num_orders, self.num_heads)
        self.register_buffer("primes", primes, persistent=False)
        self.register_buffer("row_offsets", torch.arange(num_tables, dtype=torch.int64) * self.buckets, persistent=False)
        self.fast_path = self.num_orders == 2 and self.num_heads == 2
        self.proj = make_linear(args, args.engram_dim, args.model_dim)  # zero-initialised by GPT: starts silent
        self.key = make_linear(args, args.engram_dim, args.model_dim)
        self.gate_scale = nn.Parameter(torch.tensor([math.log(math.expm1(0.9))]))  # scale 1.0 at the start

    def order_validity(self, input_ids: Tensor) -> Tensor:
        """[B, T, orders]: whether the n-gram ending at t lies inside t's document and the window."""
        positions = torch.arange(input_ids.size(1), device=input_ids.device)
        spans = torch.arange(1, self.num_orders + 1, device=input_ids.device)  # an n-gram reaches back n-1 tokens
        return (positions[None, :, None] - spans) >= document_starts(input_ids).unsqueeze(-1)

    def bucket_ids(self, input_ids: Tensor) -> Tensor:
        """[B, T, orders*heads] bucket of each table (order-major), by a loop over orders, heads and tokens."""
        ids = input_ids.long()
        columns = []
        for order in range(self.num_orders):
            for head in range(self.num_heads):
                prime = self.primes[order, head]
                h = shift_right(ids, order + 1)
                for back in range(order, -1, -1):
                    h = (h * prime + shift_right(ids, back)) % self.buckets
                columns.append(h)
        return torch.stack(columns, dim=-1)

    def bucket_ids_2x2(self, input_ids: Tensor) -> Tensor:
        """bucket_ids for 2 orders x 2 heads in a few broadcast operations (the common configuration)."""
        ids = input_ids.long().unsqueeze(-1)
        prev1, prev2 = shift_right(input_ids.long(), 1).unsqueeze(-1), shift_right(input_ids.long(), 2).unsqueeze(-1)
        p2, p3 = self.primes[0], self.primes[1]
        bigram = (prev1 * p2 + ids) % self.buckets
        trigram = (((prev2 * p3 + prev1) % self.buckets) * p3 + ids) % self.buckets
        return torch.cat((bigram, trigram), dim=-1)

    def memory(self, input_ids: Tensor) -> Tensor:
        """[B, T, ENGRAM_DIM]: the concatenated table rows, zero for masked keys."""
        buckets = self.bucket_ids_2x2(input_ids) if self.fast_path else self.bucket_ids(input_ids)
        rows = F.embedding(buckets + self.row_offsets, self.table)  # [B, T, tables, width]
        valid = self.order_validity(input_ids).repeat_interleave(self.num_heads, dim=-1)
        return (rows * valid.unsqueeze(-1).to(rows.dtype)).flatten(2)

    def forward(self, input_ids: Tensor, hidden: Tensor) -> Tensor:
        memory = self.memory(input_ids).to(hidden.dtype)
        key = self.key(memory)
        scale = (F.softplus(self.gate_scale) + 0.1).clamp(max=4.0).to(hidden.dtype)
        cosine = (rms_norm(hidden) * rms_norm(key)).mean(-1, keepdim=True)
        return torch.sigmoid(scale * cosine) * self.proj(memory)
# --- end feature: engram_hash ---


# --- feature: moe (MOE_ENABLED) ---
# Router health figures. Each routing layer returns one row per forward pass:
# top-1 token counts per expert [E] | top-k assignment counts per expert [E] | sum of top-1 probabilities |
# sum of routing entropies (nats) | tokens | balance loss | passes (1). Rows add up over micro-batches, steps and
# ranks; router_health() turns a sum into the logged figures.
def router_stats_width(num_experts: int) -> int:
    return 2 * num_experts + 5


def first_moe_layer(args: Hyperparameters) -> int:
    """MoE replaces the MLP of the last ceil(MOE_LAYER_FRAC * NUM_LAYERS) layers."""
    return args.num_layers - max(1, math.ceil(args.moe_layer_frac * args.num_layers - 1e-9))


class TernaryMoE(nn.Module):
    """Ternary MLP experts with top-k routing, in place of a block's MLP.

    Before the MoE start (MOE_START_FRACTION of the training clock) the layer runs expert 0 alone as a plain MLP;
    start_routing() then copies expert 0 into every expert (upcycling), so routing begins from the trained MLP.
    The persistent `routing` buffer records the state, so an artifact is evaluated the way it was trained.
    At top-1 the expert's output is weighted by its router probability, not renormalised to 1 (a constant weight
    of 1 would give the router no gradient); at top-k > 1 the k probabilities are renormalised to sum to 1.
    Every expert runs on every token and unselected outputs are weighted by exactly zero: static shapes (no host
    sync, no recompilation), an unselected expert gets an exactly zero gradient, at the cost of E times the MLP
    compute in these layers.
    """

    def __init__(self, args: Hyperparameters):
        super().__init__()
        self.num_experts, self.top_k, self.temperature = args.moe_num_experts, args.moe_top_k, args.moe_router_temperature
        self.aux_coef, self.z_coef = args.moe_router_aux_loss_coef, args.moe_router_z_loss_coef
        self.router = CastedLinear(args.model_dim, self.num_experts, role="scalar")
        self.experts = nn.ModuleList(MLP(args) for _ in range(self.num_experts))
        self.register_buffer("routing", torch.tensor(float(args.moe_start_fraction == 0.0)))
        self.routing_on = args.moe_start_fraction == 0.0  # the buffer's value, read without a device sync

    def _load_from_state_dict(self, state_dict, prefix, *rest):
        super()._load_from_state_dict(state_dict, prefix, *rest)
        self.routing_on = bool(self.routing)

    @torch.no_grad()
    def start_routing(self) -> None:
        for expert in self.experts[1:]:
            expert.load_state_dict(self.experts[0].state_dict())
        self.routing.fill_(1.0)
        self.routing_on = True

    def forward(self, x: Tensor, ctx: ForwardContext) -> Tensor:
        if not self.routing_on:
            return self.experts[0](x)
        logits = self.router(x).float() / self.temperature
        probs = torch.softmax(logits, dim=-1)
        top_p, top_i = probs.topk(self.top_k, dim=-1)
        weights = top_p if self.top_k == 1 else top_p / top_p.sum(-1, keepdim=True)
        dense = torch.zeros_like(probs).scatter(-1, top_i, weights).to(x.dtype)
        out = sum(dense[..., e:e + 1] * expert(x) for e, expert in enumerate(self.experts))
        flat_probs, flat_top = probs.reshape(-1, self.num_experts), top_i.reshape(-1, self.top_k)
        assigned = expert_counts(flat_top, self.num_experts)
        balance = self.num_experts * (assigned / assigned.sum() * flat_probs.mean(0)).sum()
        z_loss = torch.logsumexp(logits, dim=-1).square().mean()
        ctx.aux_losses.append(self.aux_coef * balance + self.z_coef * z_loss)
        ctx.router_stats.append(router_stats_row(flat_probs.detach(), flat_top, balance.detach()))
        return out


def expert_counts(choices: Tensor, num_experts: int) -> Tensor:
    """How many of `choices` (expert indices, any shape) name each expert, as floats (no device sync)."""
    flat = choices.reshape(-1)
    return torch.zeros(num_experts, device=flat.device).index_add_(0, flat, torch.ones(flat.numel(), device=flat.device))


def router_stats_row(probs: Tensor, top_i: Tensor, balance: Tensor) -> Tensor:
    """One ROUTER_STATS row from a pass's router probabilities [tokens, E] and top-k choices [tokens, k]."""
    num_experts = probs.size(-1)
    top1 = expert_counts(top_i[:, 0], num_experts)
    assigned = expert_counts(top_i, num_experts)
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum()
    figures = torch.stack((probs.gather(-1, top_i[:, :1]).sum(), entropy, torch.tensor(float(probs.size(0)),
                           device=probs.device), balance.float(), torch.ones((), device=probs.device)))
    return torch.cat((top1, assigned, figures))


COLLAPSE_MAX_FRAC = 0.90  # one expert takes this share of the top-1 choices: collapsed


def router_health(stats: Tensor) -> tuple[list[dict[str, float]], dict[str, float]]:
    """Per routing layer and summed over layers, from summed ROUTER_STATS rows [layers, width]:
    top1_p (mean top-1 probability), max_frac (largest share of top-1 choices one expert takes), entropy (mean
    routing entropy, nats; ln E is uniform), aux (mean balance loss, 1.0 is perfectly balanced), active (experts
    given at least one token). collapsed: max_frac_max >= 0.90 or active_min <= 1."""
    stats = stats.double().cpu()
    num_experts = (stats.size(1) - 5) // 2
    layers = []
    for row in stats:
        top1, assigned = row[:num_experts], row[num_experts:2 * num_experts]
        top1_p_sum, entropy_sum, tokens, balance_sum, passes = row[2 * num_experts:].tolist()
        layers.append({"top1_p": top1_p_sum / tokens, "max_frac": float(top1.max()) / tokens,
                       "entropy": entropy_sum / tokens, "aux": balance_sum / passes,
                       "active": int((assigned > 0).sum())})
    summary = {"top1_p_mean": sum(l["top1_p"] for l in layers) / len(layers),
               "max_frac_mean": sum(l["max_frac"] for l in layers) / len(layers),
               "max_frac_max": max(l["max_frac"] for l in layers),
               "entropy_mean": sum(l["entropy"] for l in layers) / len(layers),
               "ln_experts": math.log(num_experts),
               "aux_mean": sum(l["aux"] for l in layers) / len(layers),
               "active_min": min(l["active"] for l in layers)}
    summary["collapsed"] = int(summary["max_frac_max"] >= COLLAPSE_MAX_FRAC or summary["active_min"] <= 1)
    return layers, summary


def router_health_lines(key: str, stats: Tensor, step: int) -> list[str]:
    layers, summary = router_health(stats)
    lines = [f"{key}_layer step:{step} layer:{i} top1_p:{l['top1_p']:.4f} max_frac:{l['max_frac']:.4f} "
             f"entropy:{l['entropy']:.4f} aux:{l['aux']:.4f} active:{l['active']}" for i, l in enumerate(layers)]
    lines.append(f"{key} step:{step} " + " ".join(f"{name}:{value:.4f}" if isinstance(value, float) else f"{name}:{value}"
                                                   for name, value in summary.items()))
    if summary["collapsed"]:
        lines.append(f"WARNING: router collapse at step {step} (max_frac_max:{summary['max_frac_max']:.3f} "
                     f"active_min:{summary['active_min']}): raise MOE_ROUTER_AUX_LOSS_COEF, lower the router's "
                     "learning rate (SCALAR_LR) or raise MOE_ROUTER_TEMPERATURE")
    return lines


def moe_routing_started(model: nn.Module) -> bool:
    return any(module.routing_on for module in model.modules() if isinstance(module, TernaryMoE))


def start_moe_routing(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, TernaryMoE):
            module.start_routing()
# --- end feature: moe ---


def document_scan(u: Tensor, log_decay: Tensor, doc: Tensor, chunk: int) -> Tensor:
    """h_t = a*h_{t-1} + u_t in fp32, a = exp(log_decay) per channel, restarting at each document start (doc_t == t),
    so offset k weighs a^k. Two levels: `chunk` sequential steps inside every chunk at once, then the chunks' final
    states carried forward, entering position i of a chunk as a^(i+1) h_prev unless a document starts in between.
    A restart replaces the state (never subtracts it), so a position's value is bit-identical whatever an earlier
    document held. A length that is not a multiple of `chunk` is padded, then stripped."""
    B, T, D = u.shape
    pad = -T % chunk
    if pad:
        u = F.pad(u, (0, 0, 0, pad))
        doc = torch.cat((doc, torch.arange(T, T + pad, device=doc.device).expand(B, pad)), dim=1)
    n = u.size(1) // chunk
    u = u.float().view(B, n, chunk, D)
    positions = torch.arange(n * chunk, device=u.device).view(1, n, chunk)
    restart = (doc.view(B, n, chunk) == positions).unsqueeze(-1)
    decay = log_decay.float().exp()
    state = torch.zeros(B, n, D, device=u.device)
    inner = []
    for i in range(chunk):
        state = torch.where(restart[:, :, i], u[:, :, i], decay * state + u[:, :, i])
        inner.append(state)
    inner = torch.stack(inner, dim=2)
    carries = torch.where((doc.view(B, n, chunk) < positions[:, :, :1]).unsqueeze(-1),
                          torch.exp(torch.arange(1, chunk + 1, device=u.device).unsqueeze(-1) * log_decay.float()), 0.0)
    state = torch.zeros(B, D, device=u.device)
    outputs = []
    for k in range(n):
        y = inner[:, k] + carries[:, k] * state.unsqueeze(1)
        state = y[:, -1]
        outputs.append(y)
    return torch.stack(outputs, dim=1).view(B, n * chunk, D)[:, :T]


# --- feature: skc_mixer (ARCHITECTURE!=transformer) ---
def causal_depthwise_conv(x: Tensor, weight: Tensor, doc: Tensor) -> Tensor:
    """y_t = sum_k weight[:, k] * x_{t-k}, where a tap that would read before the document start reads zero."""
    T, taps = x.size(1), weight.size(1)
    positions = torch.arange(T, device=x.device)
    padded = F.pad(x, (0, 0, taps - 1, 0))
    y = torch.zeros_like(x)
    for k in range(taps):
        inside = (positions - k >= doc).unsqueeze(-1).to(x.dtype)
        y = y + weight[:, k].to(x.dtype) * padded[:, taps - 1 - k:taps - 1 - k + T] * inside
    return y


class SKCMixer(nn.Module):
    """The SKC token mixer (Koopman-SSM): a causal linear recurrence h_t = a*h_{t-1} + (1-a)*u_t with a learned decay
    a per channel (offset k weighs a^k: diagonal Koopman dynamics), after a short causal depthwise convolution, gated
    and projected back with ternary layers. Scan and convolution restart at every BOS."""
    param_roles = {"decay_logit": "scalar", "conv_weight": "scalar"}

    def __init__(self, args: Hyperparameters):
        super().__init__()
        dim = args.model_dim
        self.chunk = args.skc_chunk
        self.in_proj = make_linear(args, dim, dim)
        self.gate_proj = make_linear(args, dim, dim)
        self.out_proj = make_linear(args, dim, dim)  # not zero-initialised: the block's residual scale starts at 0
        conv = torch.zeros(dim, args.skc_conv_kernel)
        conv[:, 0] = 1.0  # starts as the identity
        self.conv_weight = nn.Parameter(conv)
        # memory lengths 1/(1-a) spread log-uniformly from 2 tokens to the training window
        timescales = torch.logspace(math.log10(2.0), math.log10(max(args.train_seq_len, 4)), dim)
        rate = -torch.log1p(-1.0 / timescales)  # -log a
        self.decay_logit = nn.Parameter(torch.log(torch.expm1(rate)))  # softplus^-1

    def log_decay(self) -> Tensor:
        return -F.softplus(self.decay_logit.float())

    def spectral_loss(self, seq_len: int) -> Tensor:
        """Mean memory length beyond the window, as a fraction of it: decay rates whose memory the window cuts off."""
        memory = 1.0 / -torch.expm1(self.log_decay())
        return F.relu(memory / seq_len - 1.0).mean()

    def forward(self, x: Tensor, ctx: ForwardContext) -> Tensor:
        log_decay = self.log_decay()
        u = causal_depthwise_conv(self.in_proj(x), self.conv_weight, ctx.doc_starts)
        h = document_scan(-torch.expm1(log_decay) * u.float(), log_decay, ctx.doc_starts, self.chunk)
        return self.out_proj(h.to(x.dtype) * F.silu(self.gate_proj(x)))


def skc_spectral_loss(model: GPT, seq_len: int) -> Tensor:
    return torch.stack([block.skc.spectral_loss(seq_len) for block in model.blocks if block.skc is not None]).mean()
# --- end feature: skc_mixer ---


class Block(nn.Module):
    """Pre-norm block; resid_mix blends the running stream with the input embedding x0.

    The token mixer is attention or, in the layers that skc_layers names, the SKC mixer, whose residual scale starts at
    zero (SkipInit). With SHARED_BLOCKS, layer i >= S runs the mixer and MLP of layer i % S (`shared`, a tuple, so
    those weights register, count and export once) with scales of its own. SKC_PARALLEL_RESIDUAL: the mixer and
    the MLP read the same normed input and are added together."""
    param_roles = {"attn_scale": "scalar", "mlp_scale": "scalar", "resid_mix": "scalar"}

    def __init__(self, args: Hyperparameters, layer: int, owner: Block | None = None):
        super().__init__()
        self.args = args  # the forward's feature guards read settings (so `extract --dce` can fold them)
        self.skc_mixer = layer in skc_layers(args) if args.architecture != "transformer" else False
        self.shared = (owner,) if args.shared_blocks and owner is not None else ()
        self.attn = None if self.shared or self.skc_mixer else CausalSelfAttention(args, layer)
        self.skc = SKCMixer(args) if args.architecture != "transformer" and self.skc_mixer and not self.shared else None
        self.mlp = None if self.shared else (
            TernaryMoE(args) if args.moe_enabled and layer >= first_moe_layer(args) else MLP(args))
        self.attn_scale = nn.Parameter(torch.zeros(args.model_dim) if self.skc_mixer else torch.ones(args.model_dim))
        self.mlp_scale = nn.Parameter(torch.ones(args.model_dim))
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(args.model_dim), torch.zeros(args.model_dim))))
        self.norm_scale = ln_scale_factor(layer) if args.ln_scale_damping else 1.0

    def norm(self, x: Tensor) -> Tensor:
        """The block's normed input; scaled only under LN_SCALE_DAMPING (an eager multiply by 1.0 costs a pass)."""
        return rms_norm(x) * self.norm_scale if self.args.ln_scale_damping else rms_norm(x)

    def forward(self, x: Tensor, x0: Tensor, ctx: ForwardContext) -> Tensor:
        weights = self.shared[0] if self.args.shared_blocks and self.shared else self
        mix = self.resid_mix.to(x.dtype)
        x = mix[0] * x + mix[1] * x0
        normed = self.norm(x)
        if self.args.architecture != "transformer" and self.skc_mixer:
            mixed = weights.skc(normed, ctx)
        else:
            mixed = weights.attn(normed, ctx)
        if self.args.skc_parallel_residual:
            return x + self.attn_scale.to(x.dtype) * mixed + self.mlp_scale.to(x.dtype) * weights.mlp(normed, ctx)
        x = x + self.attn_scale.to(x.dtype) * mixed
        return x + self.mlp_scale.to(x.dtype) * weights.mlp(self.norm(x), ctx)


# --- feature: capsules (CAPSULE_ENABLED) ---
class CapsuleBank(nn.Module):
    """CAPSULE_NUM capsules of width CAPSULE_DIM summarise the document so far: capsule k at position t is the
    routing-weighted mean of its value vectors over the document's positions up to t (never a later one, never an
    earlier document). The state reaches the stream through a gated adapter whose gate starts nearly closed."""
    param_roles = {"gate": "scalar"}

    def __init__(self, args: Hyperparameters):
        super().__init__()
        self.num, self.dim, self.chunk = args.capsule_num, args.capsule_dim, args.skc_chunk
        self.route = make_linear(args, args.model_dim, self.num)
        self.read = make_linear(args, args.model_dim, self.num * self.dim)
        self.write = make_linear(args, self.num * self.dim, args.model_dim)
        self.gate = nn.Parameter(torch.full((args.model_dim,), -5.0))  # sigmoid(-5) = 0.007

    def contributions(self, h: Tensor) -> Tensor:
        """What each position adds to the capsule sums: its routing-weighted values and its weights, in fp32,
        [B, T, CAPSULE_NUM * (CAPSULE_DIM + 1)]."""
        B, T, _ = h.shape
        weight = torch.sigmoid(self.route(h).float()).unsqueeze(-1)
        values = self.read(h).float().view(B, T, self.num, self.dim)
        return torch.cat((weight * values, weight), -1).flatten(2)

    def summarize(self, h: Tensor, doc: Tensor, carry=None) -> Tensor:
        """Capsule state [B, T, CAPSULE_NUM, CAPSULE_DIM] of each position, from positions doc_t..t of h: a prefix
        sum (a scan without decay) of the weighted values and of the weights. `carry` (CAPSULE_CARRY, evaluation)
        maps the contributions to the sums of the document's positions before the window."""
        B, T, _ = h.shape
        parts = self.contributions(h)
        sums = document_scan(parts, torch.zeros((), device=h.device), doc, self.chunk)
        if carry is not None:
            sums = sums + carry(parts)
        sums = sums.view(B, T, self.num, self.dim + 1)
        return (sums[..., :-1] / (sums[..., -1:] + 1.0)).to(h.dtype)

    def inject(self, x: Tensor, state: Tensor) -> Tensor:
        return x + torch.sigmoid(self.gate).to(x.dtype) * self.write(state.flatten(2).to(x.dtype))


class CapsuleDecode(NamedTuple):
    hidden: Tensor  # the decoder's output
    state: Tensor  # each position's capsule state, from the same pass as its hidden state
    passes: Tensor  # [B, T] feedback passes each position kept


def capsule_step(model: GPT, state: Tensor) -> Tensor:
    """The capsule state one step on: the Koopman dynamics when on, else unchanged."""
    args = model.args
    return model.koopman(state) if args.koopman_enabled else state


def capsule_decode(model: GPT, mid: Tensor, decode, ctx: ForwardContext) -> CapsuleDecode:
    """The decoder (`decode`, from GPT.encode) reads the capsule state of the encoder output advanced one step;
    then the feedback passes refine it."""
    args = model.args
    state = model.capsules.summarize(mid, ctx.doc_starts, ctx.capsule_carry if args.capsule_carry else None)
    hidden = decode(model.capsules.inject(mid, capsule_step(model, state)))
    decoded = CapsuleDecode(hidden, state, torch.zeros(mid.shape[:2], dtype=torch.int64, device=mid.device))
    if args.feedback_passes and (model.feedback_active or not model.training):
        decoded = feedback_passes(model, decoded, mid, decode, ctx)
    return decoded
# --- end feature: capsules ---


# --- feature: feedback_passes (FEEDBACK_PASSES) ---
def feedback_passes(model: GPT, decoded: CapsuleDecode, mid: Tensor, decode, ctx: ForwardContext) -> CapsuleDecode:
    """FEEDBACK_PASSES passes that summarise the previous pass's output into capsules (causally: position t reads
    its document's positions up to t, never a pooled window, which would let a prediction see later tokens) and
    re-run the decoder with that state.

    Training adds the consistency loss (the Koopman step of a pass's state predicts the next pass's state). At eval
    with adaptive halting, from the second feedback pass on, a position whose relative capsule update falls under the
    threshold halts: it rolls back to the previous pass's state and output, together, and keeps them. The decision
    reads only that position's state, so it stays causal; the loop ends early once every position has halted."""
    args = model.args
    hidden, state, passes = decoded.hidden, decoded.state, decoded.passes
    halting = args.adaptive_halt_enabled and not model.training
    consistency = []
    active = torch.ones_like(passes, dtype=torch.bool)
    for p in range(args.feedback_passes):
        new_state = model.capsules.summarize(hidden, ctx.doc_starts)
        if model.training and args.koopman_consistency_weight > 0:
            consistency.append(F.mse_loss(capsule_step(model, state).float(), new_state.detach().float()))
        new_hidden = decode(model.capsules.inject(mid, capsule_step(model, new_state)))
        if halting and p > 0:
            update = (new_state - state).float().flatten(2).norm(dim=-1)
            active = active & (update >= args.adaptive_halt_threshold * state.float().flatten(2).norm(dim=-1))
            new_state = torch.where(active[..., None, None], new_state, state)
            new_hidden = torch.where(active[..., None], new_hidden, hidden)
        hidden, state, passes = new_hidden, new_state, passes + active.long()
        if halting and not bool(active.any()):  # (evaluation only: a host sync)
            break
    if consistency:
        ctx.aux_losses.append(args.koopman_consistency_weight * torch.stack(consistency).mean())
    return CapsuleDecode(hidden, state, passes)
# --- end feature: feedback_passes ---


# --- feature: koopman (KOOPMAN_ENABLED) ---
KOOPMAN_MAX_ABS = 0.998  # |D| stays under 0.999, and so does the norm of D + UV^T


class KoopmanDynamics(nn.Module):
    """One step of linear dynamics on each capsule: c -> H (D + U V^T) H c, H the orthonormal Hadamard matrix.
    clamp_() keeps it a contraction after every optimizer step (spectral radius <= its norm < 1)."""
    param_roles = {"diag": "koopman", "left": "koopman", "right": "koopman"}

    def __init__(self, args: Hyperparameters):
        super().__init__()
        dim, rank = args.capsule_dim, args.koopman_rank
        self.diag = nn.Parameter(torch.full((dim,), 0.9))
        self.left = nn.Parameter(torch.zeros(dim, rank))  # starts diagonal
        self.right = nn.Parameter(torch.randn(dim, rank) / math.sqrt(dim))
        self.register_buffer("hadamard", hadamard_matrix(dim), persistent=False)

    def operator(self) -> Tensor:
        return torch.diag(self.diag) + self.left @ self.right.T

    def forward(self, state: Tensor) -> Tensor:
        rotated = state.float() @ self.hadamard
        return ((rotated @ self.operator().T) @ self.hadamard).to(state.dtype)

    @torch.no_grad()
    def clamp_(self) -> None:
        """|D| <= KOOPMAN_MAX_ABS, then D and U shrink together until max|D| + |U|_F |V|_F <= KOOPMAN_MAX_ABS, a
        bound on the norm of D + UV^T (tensor ops only: no host sync)."""
        self.diag.clamp_(-KOOPMAN_MAX_ABS, KOOPMAN_MAX_ABS)
        bound = self.diag.abs().max() + self.left.norm() * self.right.norm()
        shrink = (KOOPMAN_MAX_ABS / bound).clamp(max=1.0)
        self.diag.mul_(shrink)
        self.left.mul_(shrink)
# --- end feature: koopman ---


def softcap(logits: Tensor, cap: float, kind: str) -> Tensor:
    """Bound logits to (-cap, cap). poly: c*f(z/c) with f(z) = z - 4z^3/27 on |z| <= 1.5, which reaches 1 with slope 0."""
    if cap <= 0:
        return logits
    if kind == "tanh":
        return cap * torch.tanh(logits / cap)
    z = (logits / cap).clamp(-1.5, 1.5)
    return cap * (z - (4.0 / 27.0) * z * z * z)


class GPT(nn.Module):
    """U-Net GPT: the first half of the blocks push skips that the second half pops, in reverse, with learned weights."""
    param_roles = {"skip_weights": "scalar"}

    def __init__(self, args: Hyperparameters, vocab_size: int):
        super().__init__()
        self.args = args
        embed_dim = args.embed_dim or args.model_dim
        self.tok_emb = with_roles(nn.Embedding(vocab_size, embed_dim), weight="embed")
        self.embed_proj = CastedLinear(embed_dim, args.model_dim) if args.embed_dim else None  # factored embedding
        self.head_proj = CastedLinear(args.model_dim, embed_dim) if args.embed_dim else None
        self.lm_head = None if args.tie_embeddings else CastedLinear(args.model_dim, vocab_size, role="head")
        self.num_encoder_layers = args.num_layers // 2
        self.num_decoder_layers = args.num_layers - self.num_encoder_layers
        self.skip_weights = nn.Parameter(torch.ones(min(self.num_encoder_layers, self.num_decoder_layers), args.model_dim))
        self.blocks = nn.ModuleList()
        for layer in range(args.num_layers):
            owner = self.blocks[layer % args.shared_blocks] if args.shared_blocks and layer >= args.shared_blocks else None
            self.blocks.append(Block(args, layer, owner))
        self.smear = SmearGate(args.model_dim) if args.smear_gate else None
        self.engram = EngramHash(args) if args.engram_enabled else None
        self.capsules = CapsuleBank(args) if args.capsule_enabled else None
        self.koopman = KoopmanDynamics(args) if args.koopman_enabled else None
        self.recurrence_band = recurrence_band(args) if args.recurrence_depth else ()
        # Training-phase switches that the training loop sets (set_training_phase); evaluation and export run the
        # full graph. Each combination is one fixed graph, compiled once.
        self.recurrence_active = args.recurrence_depth > 0
        self.feedback_active = True
        # fitted after training on training tokens; part of the artifact
        self.register_buffer("logit_temperature", torch.tensor(1.0) if args.eval_temperature_fit else None)
        self._init_weights()
        self.embed_format: str | None = None
        self.simulate_storage(args)

    def simulate_storage(self, args: Hyperparameters | None) -> None:
        """Let the forward compute with every fp8/fp4-stored matrix (storage_format) exactly as export will store
        it. None: compute with the weights as they are (a model loaded from an artifact holds the stored values)."""
        roles, params = parameter_roles(self), dict(self.named_parameters())

        def simulated(name: str) -> str | None:
            fmt = storage_format(name, roles[name], params[name].numel(), args) if args is not None else "fp16"
            return fmt if fmt in ("fp8", "fp4") else None
        for prefix, module in self.named_modules():
            if isinstance(module, CastedLinear):
                module.storage_format = simulated(f"{prefix}.weight")
        self.embed_format = simulated("tok_emb.weight")

    def _init_weights(self) -> None:
        std = self.args.tied_embed_init_std if self.args.tie_embeddings else 1.0 / math.sqrt(self.tok_emb.embedding_dim)
        nn.init.normal_(self.tok_emb.weight, std=std)
        for module in self.modules():  # output projections start at zero, so every block starts as the identity
            if isinstance(module, (CausalSelfAttention, MLP)):
                nn.init.zeros_(module.proj.weight)
        if self.args.engram_enabled:  # the memory starts silent too
            nn.init.zeros_(self.engram.proj.weight)
        if self.lm_head is not None:
            nn.init.zeros_(self.lm_head.weight)

    def set_attention_backend(self, name: str, flash_fn) -> None:
        for block in self.blocks:
            if block.attn is not None:  # (an SKC layer, or a layer that runs a shared block's attention)
                block.attn.backend, block.attn.flash_fn = name, flash_fn

    def embedding_weight(self) -> Tensor:
        w = self.tok_emb.weight
        return w if self.embed_format is None else fp_fake_quant(w, self.embed_format)

    def encode(self, input_ids: Tensor, ctx: ForwardContext):
        """(encoder output, decode): decode(h) runs the decoder blocks on h, each call popping its own copy of the
        encoder's skips (the feedback passes run the decoder more than once)."""
        x = F.embedding(input_ids, self.embedding_weight())
        if self.embed_proj is not None:
            x = self.embed_proj(x)
        x = rms_norm(x)
        if self.args.smear_gate:
            x = self.smear(x, input_ids)
        if self.args.architecture != "transformer" or self.args.capsule_enabled:
            ctx.doc_starts = document_starts(input_ids)
        x0 = x
        skips: list[Tensor] = []
        x = self.run_layers(range(self.num_encoder_layers), x, x0, skips, ctx, input_ids)

        def decode(h: Tensor) -> Tensor:
            return self.run_layers(range(self.num_encoder_layers, self.args.num_layers), h, x0, list(skips), ctx, input_ids)
        return x, decode

    def hidden_states(self, input_ids: Tensor, ctx: ForwardContext | None = None) -> Tensor:
        ctx = ForwardContext() if ctx is None else ctx
        mid, decode = self.encode(input_ids, ctx)
        x = capsule_decode(self, mid, decode, ctx).hidden if self.args.capsule_enabled else decode(mid)
        if self.args.architecture != "transformer" and self.args.skc_spectral_weight > 0 and self.training:
            ctx.aux_losses.append(self.args.skc_spectral_weight * skc_spectral_loss(self, input_ids.size(1)))
        return rms_norm(x)

    def run_layers(self, layers: range, x: Tensor, x0: Tensor, skips: list[Tensor], ctx: ForwardContext,
                   input_ids: Tensor | None) -> Tensor:
        """Blocks `layers` in order: an encoder block pushes a skip, a decoder block pops one. With depth recurrence
        active, the band re-runs RECURRENCE_DEPTH more times after its last layer."""
        for i in layers:
            if self.args.engram_enabled and i == self.args.engram_layer:
                x = x + self.engram(input_ids, x)
            if i >= self.num_encoder_layers and skips:
                x = x + self.skip_weights[i - self.num_encoder_layers].to(x.dtype) * skips.pop()
            x = self.blocks[i](x, x0, ctx)
            if self.args.recurrence_depth and self.recurrence_active and i == self.recurrence_band[-1]:
                for _ in range(self.args.recurrence_depth):
                    for j in self.recurrence_band:
                        x = self.blocks[j](x, x0, ctx)
            if i < self.num_encoder_layers:
                skips.append(x)
        return x

    def logits(self, hidden: Tensor) -> Tensor:
        if self.lm_head is not None:
            raw = self.lm_head(hidden)
        else:
            if self.head_proj is not None:
                hidden = self.head_proj(hidden)
            raw = F.linear(hidden, self.embedding_weight().to(hidden.dtype))
        capped = softcap(raw.float(), self.args.logit_softcap, self.args.softcap_type)
        return capped if self.logit_temperature is None else capped / self.logit_temperature

    def forward(self, input_ids: Tensor, with_aux: bool = False) -> Tensor | tuple[Tensor, ModelAux]:
        """Logits [B, T, vocab] in fp32, after the softcap; with_aux: also the auxiliary objective terms and
        router figures of this pass (training only: evaluation scores the logits alone)."""
        ctx = ForwardContext()
        logits = self.logits(self.hidden_states(input_ids, ctx))
        if not with_aux:
            return logits
        loss = torch.stack(ctx.aux_losses).sum() if ctx.aux_losses else torch.zeros((), device=logits.device)
        stats = torch.stack(ctx.router_stats) if ctx.router_stats else None
        return logits, ModelAux(loss, stats)


def token_losses(logits: Tensor, target_ids: Tensor) -> Tensor:
    """Pure cross-entropy per target token, in nats (this is what val_loss and val_bpb sum)."""
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), target_ids.reshape(-1), reduction="none").view_as(target_ids)


def training_loss(logits: Tensor, target_ids: Tensor, z_loss_weight: float) -> tuple[Tensor, Tensor]:
    """(objective, cross-entropy): the objective adds the z-loss; the reported loss never does."""
    ce = token_losses(logits, target_ids).mean()
    if z_loss_weight <= 0:
        return ce, ce
    return ce + z_loss_weight * torch.logsumexp(logits, dim=-1).square().mean(), ce


# -----------------------------------------------------------------------------
# Optimizers
# -----------------------------------------------------------------------------
def zeropower_via_newtonschulz5(G: Tensor, steps: int, row_norm: bool = False) -> Tensor:
    """Approximately orthogonalize G (quintic Newton-Schulz). A zero G gives zero, never NaN, without a branch on
    its norm (a branch would read a device value back to the host)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.bfloat16() if G.is_cuda else G.float()
    if row_norm:  # MuonEq-R: equalize row norms before orthogonalizing
        X = X / X.norm(dim=1, keepdim=True).clamp_min(1e-7)
    X = X / (X.norm() + 1e-7)  # a zero G stays exactly zero through the iteration (no branch, so no device sync)
    transposed = G.size(0) > G.size(1)
    if transposed:
        X = X.T
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return (X.T if transposed else X).to(G.dtype)


class Muon(torch.optim.Optimizer):
    """Momentum + Newton-Schulz orthogonalized updates for matrices.

    Under torch.distributed each rank orthogonalizes a round-robin share of the matrices and one all-reduce
    assembles every update on every rank (in bf16 on CUDA, as the official script does). A matrix "got a
    gradient" when its gradient is nonzero (under DDP an unused parameter's gradient exists, zero-filled, e.g.
    an expert no token chose): only such matrices move, decay and advance their momentum. DDP gives every rank
    the same gradients, so the decision is the same everywhere and is made on the device, without a collective
    or a host read. `orthogonalize` is zeropower_via_newtonschulz5 or its compiled form.
    """

    def __init__(self, params, lr: float, momentum: float, backend_steps: int, weight_decay: float = 0.0,
                 row_norm: bool = False, nesterov: bool = True, orthogonalize=zeropower_via_newtonschulz5):
        super().__init__(params, dict(lr=lr, momentum=momentum, backend_steps=backend_steps, weight_decay=weight_decay,
                                      row_norm=row_norm, nesterov=nesterov))
        self.orthogonalize = orthogonalize

    @staticmethod
    def owner(index: int, world_size: int) -> int:
        """The rank that orthogonalizes a group's index-th matrix and keeps its momentum (round robin)."""
        return index % world_size

    @torch.no_grad()
    def step(self):
        distributed = dist.is_available() and dist.is_initialized()
        world_size, rank = (dist.get_world_size(), dist.get_rank()) if distributed else (1, 0)
        for group in self.param_groups:
            params = group["params"]
            if not params:
                continue
            device = params[0].device
            flat = torch.zeros(sum(p.numel() for p in params), device=device,
                               dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
            got_grad = [(p.grad.norm() > 0).to(flat.dtype) if p.grad is not None else None for p in params]
            offset = 0
            for i, p in enumerate(params):
                if self.owner(i, world_size) == rank and p.grad is not None:
                    state = self.state[p]
                    buf = state.setdefault("momentum_buffer", torch.zeros_like(p.grad))
                    buf.mul_(1.0 + (group["momentum"] - 1.0) * got_grad[i]).add_(p.grad)  # held without a gradient
                    g = p.grad.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf
                    g = self.orthogonalize(g, group["backend_steps"], group["row_norm"])
                    g = g * max(1.0, g.size(0) / g.size(1)) ** 0.5
                    flat[offset:offset + p.numel()] = g.reshape(-1) * got_grad[i]
                offset += p.numel()
            if distributed:
                dist.all_reduce(flat)
            offset = 0
            for i, p in enumerate(params):
                if p.grad is not None:
                    if group["weight_decay"]:
                        p.mul_(1.0 - group["lr"] * group["weight_decay"] * got_grad[i].to(p.dtype))
                    p.add_(flat[offset:offset + p.numel()].view_as(p).to(p.dtype), alpha=-group["lr"])
                offset += p.numel()


def build_optimizers(model: nn.Module, args: Hyperparameters, fused: bool,
                     compile_ns: bool = False) -> tuple[list[torch.optim.Optimizer], dict[str, list[str]]]:
    """One optimizer group per parameter role: Muon for matrices, Adam for the rest."""
    groups: dict[str, list[str]] = {role: [] for role in ROLES}
    params = dict(model.named_parameters())
    for name, role in parameter_roles(model).items():
        if params[name].requires_grad:
            groups[role].append(name)
    adam_groups = []
    embed_lr = args.tied_embed_lr if args.tie_embeddings else args.embed_lr
    for kind, lr, decay in (("embed", embed_lr, args.embed_weight_decay), ("head", args.head_lr, args.embed_weight_decay),
                            ("scalar", args.scalar_lr, 0.0), ("hash_table", args.engram_lr, 0.0),
                            ("koopman", args.koopman_lr, 0.0)):
        if groups[kind]:
            adam_groups.append(dict(params=[params[n] for n in groups[kind]], lr=lr, base_lr=lr, weight_decay=decay,
                                    kind=kind))
    optimizers: list[torch.optim.Optimizer] = [
        torch.optim.AdamW(adam_groups, betas=(args.beta1, args.beta2), eps=args.adam_eps, fused=fused)]
    if groups["matrix"]:
        orthogonalize = torch.compile(zeropower_via_newtonschulz5) if compile_ns else zeropower_via_newtonschulz5
        muon = Muon([params[n] for n in groups["matrix"]], lr=args.matrix_lr, momentum=args.muon_momentum,
                    backend_steps=args.muon_backend_steps, weight_decay=args.muon_weight_decay, row_norm=args.muon_row_norm,
                    orthogonalize=orthogonalize)
        for group in muon.param_groups:
            group["base_lr"], group["kind"] = args.matrix_lr, "matrix"
        optimizers.append(muon)
    return optimizers, groups


# -----------------------------------------------------------------------------
# Training loop
# -----------------------------------------------------------------------------
class Runtime(NamedTuple):
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    distributed: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self):
        if self.device.type == "cuda":
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return torch.autocast(device_type="cpu", enabled=False)

    def all_reduce(self, t: Tensor, op=None) -> Tensor:
        if self.distributed:
            dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
        return t

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def init_runtime(args: Hyperparameters) -> Runtime:
    distributed = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls outside autocast (Newton-Schulz on fp32 weights)
        torch.backends.cudnn.allow_tf32 = True
    else:
        device = torch.device("cpu")
    if args.deterministic:  # before the first cuBLAS call, which reads its workspace setting
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(args.deterministic)  # on: an op with no deterministic kernel raises, naming itself
    if distributed:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None,
                                timeout=timedelta(seconds=args.dist_timeout_seconds))
    return Runtime(rank, world_size, local_rank, device, distributed)


GLIBC_M_TRIM_THRESHOLD, GLIBC_M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)


def keep_large_cpu_blocks() -> bool:
    """Under glibc, serve host allocations under 1 GiB from the heap and keep up to 1 GiB of freed memory in the
    process. By default glibc maps every block of 32 MiB or more (the logits of a step of 8192 tokens x 1024 in
    fp32) afresh and unmaps it when it is freed, so every step page-faults its largest tensors in again: about
    10 % of a CPU training step (bench/ablations/proxy.md). Returns whether glibc took both settings."""
    if platform.system() != "Linux":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # another C library (musl): keep its defaults
        return False
    return all(libc.mallopt(option, 1 << 30) == 1 for option in (GLIBC_M_MMAP_THRESHOLD, GLIBC_M_TRIM_THRESHOLD))


def set_collective_timeout(rt: Runtime, seconds: float) -> None:
    """How long a collective may wait for the slowest rank before the job fails (NCCL's watchdog aborts the
    process; gloo raises). Short in the step loop, where ranks stay in lockstep; long around compilation,
    calibration, export and evaluation, where one rank can legitimately run minutes ahead."""
    if rt.distributed:
        dist.distributed_c10d._set_pg_timeout(timedelta(seconds=seconds))


class RunStopped(Exception):
    """A signal ended the run; the message says where, the exit status follows the shell's 128 + signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_status = 128 + signum


class RunStatus:
    """Where the run is (phase, step), for the line that says why it stopped, and whether SIGTERM arrived.

    SIGTERM in the step loop only sets a flag: the per-step all-reduce carries it, so every rank stops after the
    same step. Anywhere else it stops the run at once. SIGINT keeps Python's KeyboardInterrupt."""

    def __init__(self):
        self.phase, self.step, self.sigterm = "start-up", 0, False
        self.artifact: Path | None = None  # written by this run; renamed when the run fails after export
        self._previous_handler = None

    def _on_sigterm(self, signum, frame) -> None:
        self.sigterm = True
        if self.phase != "training":
            raise RunStopped(f"SIGTERM during {self.phase}", signum)

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)

    def uninstall(self) -> None:
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)


def together(rt: Runtime, check):
    """Run a check that may fail on some ranks only (files, rank 0's outputs); when it fails anywhere, it fails on
    every rank with the first failing rank's message, so that no rank goes on to wait in a collective that the
    failed one never reaches. Returns check()'s result."""
    try:
        result, error = check(), None
    except START_UP_ERRORS as caught:
        result, error = None, caught
    if rt.distributed:
        messages = [None] * rt.world_size
        dist.all_gather_object(messages, None if error is None else str(error))
        failed = next((rank for rank, message in enumerate(messages) if message is not None), None)
        if error is None and failed is not None:
            raise ConfigError(f"rank {failed}: {messages[failed]}")
    if error is not None:
        raise error
    return result


class Logger:
    """Rank 0 writes every line to stdout and to LOG_DIR/<RUN_ID>.txt; other ranks stay silent."""

    def __init__(self, path: Path | None, append: bool = False):
        self.path = path
        if path is not None:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                if not append:
                    path.write_text("")
            except OSError as error:
                raise ConfigError(f"cannot write the log {path} ({error.strerror}): set LOG_DIR to a folder you "
                                  "can write") from None

    def __call__(self, line: str) -> None:
        if self.path is None:
            return
        print(line, flush=True)
        with open(self.path, "a") as f:
            f.write(line + "\n")


def grad_accum_steps(args: Hyperparameters, world_size: int) -> tuple[int, int]:
    """(accumulation steps, tokens per rank per micro-step) that make up TRAIN_BATCH_TOKENS on this world size."""
    seqs, rest = divmod(args.train_batch_tokens, world_size * args.train_seq_len)
    if rest or seqs == 0:
        raise ConfigError(f"TRAIN_BATCH_TOKENS={args.train_batch_tokens} must be a positive multiple of "
                          f"WORLD_SIZE*TRAIN_SEQ_LEN={world_size * args.train_seq_len}")
    accum = max(1, math.ceil(seqs * args.train_seq_len / args.train_micro_batch_tokens))
    while seqs % accum:
        accum += 1
    return accum, seqs // accum * args.train_seq_len


def post_training_fits(args: Hyperparameters) -> bool:
    """Whether calibration or temperature fitting will read training data after the step loop."""
    return bool(args.calib_max_evals and args.weight_quant == "ternary") or args.eval_temperature_fit


def training_seconds(args: Hyperparameters) -> float:
    """The step loop's share of MAX_WALLCLOCK_SECONDS: calibration and temperature fitting read training data,
    so CALIB_MAX_SECONDS comes out of it for them."""
    reserved = args.calib_max_seconds if post_training_fits(args) else 0.0
    return max(args.max_wallclock_seconds - reserved, 0.0) if args.max_wallclock_seconds > 0 else 0.0


def training_progress(step: int, elapsed_ms: float, args: Hyperparameters) -> float:
    """How far training is, 0..1: the larger of the step share of ITERATIONS and the time share of the budget."""
    by_time = elapsed_ms / (1000.0 * training_seconds(args)) if training_seconds(args) > 0 else 0.0
    return min(1.0, max(step / args.iterations, by_time))


def lr_scale(step: int, elapsed_ms: float, args: Hyperparameters, step_ms: float) -> float:
    """The learning-rate multiplier of step `step` (0-based): a linear warm-up over LR_WARMUP_STEPS times a
    linear warm-down that reaches 0 when the budget ends.

    WARMDOWN_FRACTION: the warm-down covers the last fraction of training_progress (the wall clock under a
    cap, else ITERATIONS), so it needs no step-time estimate and behaves the same for any budget.
    WARMDOWN_ITERS (the official baseline's schedule): the last WARMDOWN_ITERS steps; under a cap they are
    projected on the clock as WARMDOWN_ITERS * step_ms, where step_ms is the mean step time (train() measures
    it on the warm-up steps before step 0, so the projection holds from the first step instead of jumping
    after it). A projection longer than the budget starts below 1, as the official script's does."""
    warm = min(1.0, (step + 1) / args.lr_warmup_steps) if args.lr_warmup_steps else 1.0
    if args.warmdown_fraction > 0:
        left = 1.0 - training_progress(step, elapsed_ms, args)
        return warm * min(1.0, left / args.warmdown_fraction)
    if args.warmdown_iters <= 0:
        return warm
    down = min(1.0, max(args.iterations - step, 0) / args.warmdown_iters)
    if training_seconds(args) > 0 and step_ms > 0:
        remaining_ms = max(1000.0 * training_seconds(args) - elapsed_ms, 0.0)
        down = min(down, remaining_ms / (args.warmdown_iters * step_ms))
    return warm * down


# --- feature: ema (EMA_DECAY) ---
class WeightEMA:
    """Exponential moving average of the float weights, applied at the end of training."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {n: t.detach().clone().float() for n, t in model.state_dict().items() if t.is_floating_point()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for name, t in model.state_dict().items():
            if name in self.shadow:
                self.shadow[name].lerp_(t.float(), 1.0 - self.decay)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        state = model.state_dict()
        for name, t in self.shadow.items():
            state[name].copy_(t.to(state[name].dtype))
# --- end feature: ema ---


def train_step(model: nn.Module, loader: DistributedTokenLoader, args: Hyperparameters, rt: Runtime,
               accum: int, micro_tokens: int) -> tuple[Tensor, Tensor | None]:
    """One optimizer step's forward/backward over `accum` micro-batches; returns the mean cross-entropy and the
    summed router figures of the step (None without a routing layer)."""
    total, router_stats = torch.zeros((), device=rt.device), None
    for micro in range(accum):
        x, y = loader.next_batch(micro_tokens, args.train_seq_len)
        sync = not rt.distributed or micro == accum - 1
        context = model.no_sync() if not sync else torch.enable_grad()
        with context, rt.autocast():
            logits, aux = model(x, with_aux=True)
            objective, ce = training_loss(logits, y, args.z_loss_weight)
            ((objective + aux.loss) / accum).backward()
        total += ce.detach()
        if aux.router_stats is not None:
            router_stats = aux.router_stats if router_stats is None else router_stats + aux.router_stats
    return total / accum, router_stats


def muon_momentum(step: int, args: Hyperparameters) -> float:
    """Muon's momentum, warmed up linearly from MUON_MOMENTUM_WARMUP_START over MUON_MOMENTUM_WARMUP_STEPS."""
    warm = min(step / args.muon_momentum_warmup_steps, 1.0) if args.muon_momentum_warmup_steps else 1.0
    return (1.0 - warm) * args.muon_momentum_warmup_start + warm * args.muon_momentum


def apply_schedules(optimizers: list[torch.optim.Optimizer], args: Hyperparameters, step: int, scale: float) -> None:
    momentum = muon_momentum(step, args)
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * scale
            if isinstance(opt, Muon):
                group["momentum"] = momentum


def optimizer_step(compiled: nn.Module, model: nn.Module, loader: DistributedTokenLoader,
                   optimizers: list[torch.optim.Optimizer], args: Hyperparameters, rt: Runtime, accum: int,
                   micro_tokens: int, step: int, scale: float) -> tuple[Tensor, Tensor | None]:
    """Training step `step` at LR multiplier `scale`: forward/backward, clipping, the optimizers, zeroed gradients.
    Returns the mean cross-entropy as a device tensor and the step's summed router figures (None without MoE
    routing); nothing here reads a device value back to the host."""
    apply_schedules(optimizers, args, step, scale)
    loss, router_stats = train_step(compiled, loader, args, rt, accum, micro_tokens)
    if args.grad_clip_norm > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip_norm)
    for opt in optimizers:
        opt.step()
    if args.koopman_enabled:  # a contraction after every step
        model.koopman.clamp_()
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    return loss, router_stats


def set_training_phase(model: GPT, args: Hyperparameters, step: int, recurrent: bool) -> None:
    """The step's graph: depth recurrence once the clock has reached RECURRENCE_START_FRACTION, feedback passes on
    every FEEDBACK_EVERY-th step. Each combination is one fixed graph (compiled once, during the warm-up)."""
    if args.recurrence_depth:
        model.recurrence_active = recurrent
    if args.feedback_passes:
        model.feedback_active = step % args.feedback_every == 0


class StopVote:
    """Whether every rank stops after a step, without a host sync inside the step.

    Every step posts its local flags (the STOP_REASONS, and whether the checkpoint clock is due) as one tensor,
    all-reduced with MAX on every rank at every step, so all ranks take the same collective whatever the clock
    says. The result is copied to a (pinned) host buffer and read one step later, when the device has finished
    that step, so the read does not drain the queue. A decision therefore takes effect one step after the step
    it was posted for.
    """

    STOP_REASONS = ("time_up", "non_finite_loss", "sigterm")
    # the vote also carries CHECKPOINT_EVERY_SECONDS' clock, the MoE start and the depth recurrence start
    # (switches every rank makes together)
    FLAGS = STOP_REASONS + ("checkpoint_due", "moe_start", "recurrence_start")

    def __init__(self, rt: Runtime):
        self.rt = rt
        self.host = torch.zeros(len(self.FLAGS), pin_memory=rt.device.type == "cuda")
        self.copied = torch.cuda.Event() if rt.device.type == "cuda" else None
        self.posted_step: int | None = None

    def post(self, step: int, time_up: bool, loss: Tensor, sigterm: bool = False, checkpoint_due: bool = False,
             moe_start: bool = False, recurrence_start: bool = False) -> None:
        non_finite = (~torch.isfinite(loss)).float()
        flags = torch.stack((non_finite.new_full((), float(time_up)), non_finite,  # fills, not host copies
                             non_finite.new_full((), float(sigterm)), non_finite.new_full((), float(checkpoint_due)),
                             non_finite.new_full((), float(moe_start)), non_finite.new_full((), float(recurrence_start))))
        self.rt.all_reduce(flags, op=dist.ReduceOp.MAX)
        self.host.copy_(flags, non_blocking=True)
        if self.copied is not None:
            self.copied.record()
        self.posted_step = step

    def take(self) -> tuple[int, dict[str, bool]] | None:
        """(step, reason -> bool) of the last post, once; None when nothing is posted."""
        if self.posted_step is None:
            return None
        if self.copied is not None:
            self.copied.synchronize()
        step, self.posted_step = self.posted_step, None
        return step, {name: value > 0 for name, value in zip(self.FLAGS, self.host.tolist())}


PROGRESS_SECONDS = 30.0  # a progress line at least this often, whatever TRAIN_LOG_EVERY says


class Progress:
    """Progress lines for a long loop (rank 0 logs): at most one per PROGRESS_SECONDS, with an ETA."""

    def __init__(self, log: Logger, label: str, total: int = 0):
        self.log, self.label, self.total, self.done = log, label, total, 0  # the loop sets total when it knows it
        self.t0 = self.last = time.perf_counter()

    def advance(self, count: int) -> None:
        self.done += count
        now = time.perf_counter()
        if now - self.last >= PROGRESS_SECONDS and 0 < self.done < self.total:
            self.last = now
            elapsed = now - self.t0
            self.log(f"{self.label} progress:{self.done}/{self.total} elapsed:{elapsed:.0f}s "
                     f"eta:{elapsed * (self.total - self.done) / self.done:.0f}s")


def step_label(step: int, elapsed_ms: float, args: Hyperparameters) -> str:
    """`step:S/N` for a run bound by ITERATIONS; `step:S time:T/Bs` for one bound by the wall clock."""
    if training_seconds(args) > 0:
        return f"step:{step} time:{elapsed_ms / 1000.0:.0f}s/{training_seconds(args):.0f}s"
    return f"step:{step}/{args.iterations}"


def peak_memory_mib(rt: Runtime) -> float:
    if rt.device.type == "cuda":
        return torch.cuda.max_memory_allocated(rt.device) / 2**20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def use_compile(args: Hyperparameters, rt: Runtime) -> bool:
    return args.model_compile == "1" or (args.model_compile == "auto" and rt.device.type == "cuda")


# --- feature: checkpoints (CHECKPOINT_EVERY, CHECKPOINT_EVERY_SECONDS, RESUME_FROM) ---
# A checkpoint holds what a run needs to go on as if it had never stopped: the fp32 shadow weights and persistent
# buffers, every optimizer state keyed by parameter NAME (so a resume survives a regrouping of the optimizers), the
# EMA, each rank's loader position and RNG states, the step, the training time so far, and the resolved config and
# the code with their hashes. Layout (loading never runs code: the payload is plain tensors, numbers and strings,
# read back with weights_only=True):
#   b"SKCK" | version u8 | payload length u64 | crc32 of the payload u32 | payload (torch.save)
# Files are <run folder>/step_<step>.ckpt, gathered to rank 0 and written atomically; resuming from a folder takes
# the newest checkpoint that reads back whole and falls back to older ones.
CHECKPOINT_MAGIC = b"SKCK"
CHECKPOINT_VERSION = 1
CHECKPOINT_HEADER_BYTES = 17
CHECKPOINT_FILE = re.compile(r"step_(\d+)\.ckpt")
CHECKPOINT_KEYS = ("format", "step", "train_ms", "world_size", "model", "optimizer", "ema", "ranks", "config",
                   "config_hash", "code_hash", "train_shards")
# Settings a resume may change without RESUME_ALLOW_CONFIG_CHANGE: where files go and how often to log, validate and
# checkpoint. None of them changes what training computes.
RESUME_FREE_SETTINGS = ("RUN_ID", "LOG_DIR", "ARTIFACT_DIR", "DRY_RUN", "DIST_TIMEOUT_SECONDS", "TRAIN_LOG_EVERY",
                        "VAL_LOSS_EVERY", "CHECKPOINT_EVERY", "CHECKPOINT_EVERY_SECONDS", "CHECKPOINT_KEEP",
                        "CHECKPOINT_DIR", "RESUME_FROM", "RESUME_ALLOW_CONFIG_CHANGE")


class CheckpointError(ConfigError):
    """RESUME_FROM names a checkpoint that is truncated, corrupt or not ours, or that does not fit this run."""


def checkpoint_folder(args: Hyperparameters) -> Path:
    return Path(args.checkpoint_dir) if args.checkpoint_dir else Path(args.log_dir) / f"{args.run_id}_checkpoints"


def resolved_config(args: Hyperparameters) -> dict:
    return {name: getattr(args, name.lower()) for name in Hyperparameters.SETTINGS}


def shard_fingerprint(loader: DistributedTokenLoader) -> list[list]:
    """(file name, token count) of each training shard: a resume must read the same stream."""
    return [[Path(f).name, read_shard_header(f)] for f in loader.stream.files]


def rng_states(device: torch.device) -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, python_state, python_gauss = random.getstate()
    states = {"torch": torch.get_rng_state(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos),
                                                          int(has_gauss), float(gauss)],
              "python": [version, list(python_state), python_gauss]}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def restore_rng_states(states: dict, device: torch.device) -> None:
    torch.set_rng_state(states["torch"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, python_state, python_gauss = states["python"]
    random.setstate((version, tuple(python_state), python_gauss))
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"], device)


def optimizer_states(model: nn.Module, optimizers: list[torch.optim.Optimizer], rt: Runtime) -> dict[str, dict]:
    """This rank's share of the optimizer state, by parameter name, on the CPU: rank 0 gives the replicated (Adam)
    state; every rank gives the Muon momentum of the matrices it owns."""
    names = {id(p): name for name, p in model.named_parameters()}
    states = {}
    for opt in optimizers:
        if isinstance(opt, Muon) or rt.is_main:
            for p, state in opt.state.items():
                states[names[id(p)]] = {"optimizer": type(opt).__name__,
                                        "state": {k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in state.items()}}
    return states


def load_optimizer_states(model: nn.Module, optimizers: list[torch.optim.Optimizer], saved: dict[str, dict],
                          rt: Runtime, log: Logger) -> None:
    """Give every parameter the state saved under its name by the same kind of optimizer, whatever group it sits in
    now; a parameter without one starts fresh. Each rank takes the Muon momentum of the matrices it owns now."""
    names = {id(p): name for name, p in model.named_parameters()}
    carried, fresh = [], []
    for opt in optimizers:
        kind = type(opt).__name__
        state_dict = opt.state_dict()  # its "state" is keyed by the position of a parameter across the groups
        index = 0
        for group in opt.param_groups:
            for i, p in enumerate(group["params"]):
                name, entry = names[id(p)], saved.get(names[id(p)])
                if entry is not None and entry["optimizer"] == kind:
                    carried.append(name)
                    if not isinstance(opt, Muon) or Muon.owner(i, rt.world_size) == rt.rank:
                        state_dict["state"][index] = entry["state"]
                else:
                    fresh.append(f"{name} (was {entry['optimizer']})" if entry else name)
                index += 1
        opt.load_state_dict(state_dict)
    log(f"resume: optimizer state carried for {len(carried)} parameters")
    if fresh:
        log(f"resume: {len(fresh)} parameters start with a fresh optimizer state: {', '.join(fresh)}")
    unused = sorted(set(saved) - set(carried))
    if unused:
        log(f"resume: saved optimizer state of {len(unused)} parameters has no place in this run: {', '.join(unused)}")


def check_architecture(model: nn.Module, saved: dict[str, Tensor], path: Path) -> None:
    current = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    stored = {name: tuple(t.shape) for name, t in saved.items()}
    mismatched = [f"{name}: checkpoint {stored.get(name, 'absent')}, model {current.get(name, 'absent')}"
                  for name in sorted(set(current) | set(stored)) if current.get(name) != stored.get(name)]
    if mismatched:
        raise CheckpointError(f"{path} holds a different architecture; mismatched tensors:\n  " + "\n  ".join(mismatched)
                              + "\nresume with the model settings the checkpoint was trained with")


def check_config(args: Hyperparameters, state: dict, shards: list[list], path: Path, log: Logger) -> None:
    """Print every training setting (and the training shards) that differs from the checkpoint's; go on only with
    RESUME_ALLOW_CONFIG_CHANGE=1. A setting newer than the checkpoint counts only when it is off its default. A
    changed train_gpt.py is reported, not refused (fixes land mid-run)."""
    saved = {**state["config"], "training shards": state["train_shards"]}
    current = {**resolved_config(args), "training shards": shards}
    settings = Hyperparameters.SETTINGS
    changed = [f"{name}: {saved.get(name)!r} -> {current.get(name)!r}" for name in sorted(set(saved) | set(current))
               if name not in RESUME_FREE_SETTINGS and saved.get(name) != current.get(name)
               and not (name not in saved and name in settings and current[name] == settings[name].default)]
    for line in changed:
        log(f"resume: config change {line}")
    if changed and not args.resume_allow_config_change:
        raise CheckpointError(f"{path} was trained with different settings ({len(changed)} changed, listed above):\n  "
                              + "\n  ".join(changed) + "\nrestore them, or set RESUME_ALLOW_CONFIG_CHANGE=1 to go on")
    code_hash = sha256_file(__file__)[:16]
    if state["code_hash"] != code_hash:
        log(f"resume: WARNING train_gpt.py changed since the checkpoint (code hash {state['code_hash']} -> {code_hash})")


def checkpoint_header(payload: bytes) -> bytes:
    return (CHECKPOINT_MAGIC + bytes((CHECKPOINT_VERSION,)) + len(payload).to_bytes(8, "little")
            + zlib.crc32(payload).to_bytes(4, "little"))


def read_checkpoint(path: Path) -> dict:
    """A checkpoint's contents after checking its frame and checksum; a clear CheckpointError otherwise."""
    try:
        blob = path.read_bytes()
    except OSError as error:
        raise CheckpointError(f"checkpoint {path} cannot be read: {error}") from None
    if len(blob) < CHECKPOINT_HEADER_BYTES or blob[:4] != CHECKPOINT_MAGIC:
        raise CheckpointError(f"{path} is not an skc-golf checkpoint (bad magic or shorter than its header)")
    if blob[4] != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path} has checkpoint version {blob[4]}; this trainer reads version {CHECKPOINT_VERSION}")
    length, crc = int.from_bytes(blob[5:13], "little"), int.from_bytes(blob[13:17], "little")
    payload = memoryview(blob)[CHECKPOINT_HEADER_BYTES:]
    if len(payload) < length:
        raise CheckpointError(f"{path} is truncated: its header says {length} payload bytes, the file holds {len(payload)}")
    if len(payload) != length or zlib.crc32(payload) != crc:
        raise CheckpointError(f"{path} is corrupt: the payload checksum does not match")
    try:
        state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as error:
        raise CheckpointError(f"{path} holds something other than plain tensors and numbers, refused: {error}") from None
    if not isinstance(state, dict) or any(key not in state for key in CHECKPOINT_KEYS):
        raise CheckpointError(f"{path} lacks the fields of a version-{CHECKPOINT_VERSION} checkpoint")
    return state


def newest_valid_checkpoint(folder: Path, log: Logger) -> tuple[Path, dict] | None:
    """The newest checkpoint of a folder that reads back whole (None when the folder holds none)."""
    found = sorted(((int(m.group(1)), path) for path in folder.glob("step_*.ckpt")
                    if (m := CHECKPOINT_FILE.fullmatch(path.name))), reverse=True)
    refused = []
    for _, path in found:
        try:
            return path, read_checkpoint(path)
        except CheckpointError as error:
            refused.append(str(error))
            log(f"resume: skipping {error}")
    if refused:
        raise CheckpointError(f"no checkpoint in {folder} reads back whole:\n  " + "\n  ".join(refused))
    return None


def choose_checkpoint(args: Hyperparameters, rt: Runtime, log: Logger) -> tuple[Path | None, dict | None]:
    """Rank 0 picks the checkpoint (a file, the newest valid one of a folder, or of the run folder for `auto`) and
    tells the others, so every rank loads the same file."""
    chosen: tuple[Path, dict] | None = None
    if rt.is_main:
        target = checkpoint_folder(args) if args.resume_from == "auto" else Path(args.resume_from)
        if target.is_dir() or args.resume_from == "auto":
            chosen = newest_valid_checkpoint(target, log) if target.is_dir() else None
            if chosen is None and args.resume_from != "auto":
                raise CheckpointError(f"RESUME_FROM={args.resume_from} holds no step_*.ckpt checkpoint")
            if chosen is None:
                log(f"resume: no checkpoint in {target} yet; starting from scratch")
        else:
            chosen = target, read_checkpoint(target)
    shared = [str(chosen[0]) if chosen else ""]
    if rt.distributed:
        dist.broadcast_object_list(shared, src=0)
    if not shared[0]:
        return None, None
    return Path(shared[0]), chosen[1] if chosen else read_checkpoint(Path(shared[0]))


class ResumedRun(NamedTuple):
    step: int
    train_ms: float
    ema: WeightEMA | None


def resume_training(args: Hyperparameters, rt: Runtime, log: Logger, model: nn.Module,
                    optimizers: list[torch.optim.Optimizer], loader: DistributedTokenLoader) -> ResumedRun | None:
    """Load RESUME_FROM into the model, optimizers and loader built for this run; None when there is nothing to resume."""
    path, state = choose_checkpoint(args, rt, log)
    if path is None:
        return None
    check_architecture(model, state["model"], path)
    check_config(args, state, shard_fingerprint(loader), path, log)
    if state["step"] > args.iterations:
        raise CheckpointError(f"{path} is at step {state['step']}, past ITERATIONS={args.iterations}")
    log(f"resume: from {path} step:{state['step']} train_time:{state['train_ms']:.0f}ms "
        f"saved_world_size:{state['world_size']} ema:{'yes' if state['ema'] is not None else 'no'}")
    model.load_state_dict(state["model"])
    load_optimizer_states(model, optimizers, state["optimizer"], rt, log)
    # Every rank reads the same global span, so rank 0's position serves a different world size as well.
    mine = state["ranks"][rt.rank] if state["world_size"] == rt.world_size else state["ranks"][0]
    loader.seek(*mine["loader"])
    restore_rng_states(mine["rng"], rt.device)
    ema = None
    if state["ema"] is not None:
        ema = WeightEMA(model, args.ema_decay)
        ema.shadow = {name: t.to(rt.device) for name, t in state["ema"].items()}
    return ResumedRun(state["step"], state["train_ms"], ema)


class Checkpointer:
    """Writes the checkpoints train() asks for (every CHECKPOINT_EVERY steps, every CHECKPOINT_EVERY_SECONDS, and at
    the last step) and keeps the newest CHECKPOINT_KEEP. Writing runs inside the timed loop, so under a wall-clock
    cap its time is training time. Weights that are not finite are not saved: the vote stops the run a step later."""

    def __init__(self, args: Hyperparameters, rt: Runtime, log: Logger):
        self.args, self.rt, self.log = args, rt, log
        self.folder = checkpoint_folder(args)
        self.clock = time.perf_counter()
        self.written, self.total_ms = 0, 0.0

    def clock_due(self) -> bool:
        """This rank's own clock only; train() agrees on it through the per-step all-reduce."""
        return time.perf_counter() - self.clock >= self.args.checkpoint_every_seconds

    def save(self, step: int, train_ms: float, model: nn.Module, optimizers: list[torch.optim.Optimizer],
             loader: DistributedTokenLoader, ema: WeightEMA | None) -> None:
        t0 = time.perf_counter()
        weights = {name: t.detach().cpu() for name, t in model.state_dict().items()}
        if not all(bool(torch.isfinite(t).all()) for t in weights.values() if t.is_floating_point()):
            self.log(f"checkpoint step:{step} skipped: the weights are not finite")  # the same on every rank
            return
        local = {"optimizer": optimizer_states(model, optimizers, self.rt), "loader": list(loader.position()),
                 "rng": rng_states(self.rt.device)}
        parts = [local]
        if self.rt.distributed:
            parts = [None] * self.rt.world_size if self.rt.is_main else None
            dist.gather_object(local, parts, dst=0)
        if self.rt.is_main:
            config = resolved_config(self.args)
            state = {"format": CHECKPOINT_VERSION, "step": step, "train_ms": train_ms, "world_size": self.rt.world_size,
                     "model": weights, "optimizer": {name: entry for part in parts for name, entry in part["optimizer"].items()},
                     "ema": {name: t.cpu() for name, t in ema.shadow.items()} if ema is not None else None,
                     "ranks": [{"loader": part["loader"], "rng": part["rng"]} for part in parts],
                     "config": config,
                     "config_hash": hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16],
                     "code_hash": sha256_file(__file__)[:16], "train_shards": shard_fingerprint(loader)}
            buffer = io.BytesIO()
            torch.save(state, buffer)
            payload = buffer.getvalue()
            path = self.folder / f"step_{step:08d}.ckpt"
            self.folder.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, checkpoint_header(payload) + payload)
            self.prune()
            weights_crc = 0
            for t in weights.values():
                weights_crc = zlib.crc32(t.contiguous().view(-1).view(torch.uint8).numpy(), weights_crc)
            self.log(f"checkpoint step:{step} path:{path} bytes:{CHECKPOINT_HEADER_BYTES + len(payload)} "
                     f"weights_crc32:{weights_crc:08x} time:{1000.0 * (time.perf_counter() - t0):.0f}ms")
        self.clock, self.written = time.perf_counter(), self.written + 1
        self.total_ms += 1000.0 * (self.clock - t0)

    def prune(self) -> None:
        """Delete all but the newest CHECKPOINT_KEEP checkpoints, and temporary files of interrupted writes."""
        found = sorted((int(m.group(1)), path) for path in self.folder.glob("step_*.ckpt")
                       if (m := CHECKPOINT_FILE.fullmatch(path.name)))
        for _, path in found[:-self.args.checkpoint_keep]:
            path.unlink()
        for stale in self.folder.glob(".step_*.ckpt.*.tmp"):  # atomic_write_bytes' temporary name
            stale.unlink()

    def report(self) -> None:
        self.log(f"checkpoints written:{self.written} time:{self.total_ms:.0f}ms (inside train_time)")
# --- end feature: checkpoints ---


def train(args: Hyperparameters, rt: Runtime, log: Logger, model: GPT, val_ctx: StreamContext,
          status: RunStatus) -> dict[str, float]:
    """Warm-up, then the timed step loop; returns the training summary. Stops on every rank at the same step."""
    status.phase = "compilation and warm-up"
    compiled = torch.compile(model, dynamic=False) if use_compile(args, rt) else model
    if rt.distributed:
        from torch.nn.parallel import DistributedDataParallel
        # Before the MoE start the router and experts 1.. take no part in the graph, which DDP must be told.
        compiled = DistributedDataParallel(compiled, device_ids=[rt.local_rank] if rt.device.type == "cuda" else None,
                                           broadcast_buffers=False,
                                           find_unused_parameters=args.moe_enabled and args.moe_start_fraction > 0)
    optimizers, groups = build_optimizers(model, args, fused=rt.device.type == "cuda", compile_ns=use_compile(args, rt))
    sizes = {name: p.numel() for name, p in model.named_parameters()}
    for kind, names in groups.items():
        log(f"param_group:{kind} tensors:{len(names)} params:{sum(sizes[n] for n in names)}")
    accum, micro_tokens = grad_accum_steps(args, rt.world_size)
    log(f"grad_accum_steps:{accum} micro_batch_tokens_per_rank:{micro_tokens}")

    def synchronize() -> None:
        if rt.device.type == "cuda":
            torch.cuda.synchronize()

    # Compile and allocator warm-up on training tokens; the weights and optimizer state are restored after.
    # Its steps after the first (which compiles) also time a step, for the WARMDOWN_ITERS projection.
    warmup_step_ms = 0.0
    if args.warmup_steps:
        initial_model = copy.deepcopy(model.state_dict())
        initial_opts = [copy.deepcopy(opt.state_dict()) for opt in optimizers]
        warm_loader = DistributedTokenLoader(args.data_path, model.tok_emb.num_embeddings, rt.rank, rt.world_size, rt.device)
        for i in range(args.warmup_steps):
            if i == 1:
                synchronize()
                t_warm = time.perf_counter()
            if args.recurrence_depth or args.feedback_passes:  # alternating phases compiles each phase's graph here
                set_training_phase(model, args, i, recurrent=i % 2 == 1 or args.recurrence_start_fraction == 0)
            optimizer_step(compiled, model, warm_loader, optimizers, args, rt, accum, micro_tokens, 0, 1.0)
        if args.warmup_steps > 1:
            synchronize()
            warmup_step_ms = 1000.0 * (time.perf_counter() - t_warm) / (args.warmup_steps - 1)
        model.load_state_dict(initial_model)
        for opt, state in zip(optimizers, initial_opts):
            opt.load_state_dict(state)
        log(f"warmup_steps:{args.warmup_steps} done (weights and optimizer state restored) "
            f"step_ms:{warmup_step_ms:.1f}")

    loader = DistributedTokenLoader(args.data_path, args.vocab_size, rt.rank, rt.world_size, rt.device)
    ema = None
    max_ms = 1000.0 * training_seconds(args)
    if args.max_wallclock_seconds > 0 and max_ms <= 0:
        raise ConfigError(f"CALIB_MAX_SECONDS={args.calib_max_seconds} leaves no training time in "
                          f"MAX_WALLCLOCK_SECONDS={args.max_wallclock_seconds}")
    tokens_per_step = args.train_batch_tokens
    vote = StopVote(rt)
    train_ms, step, last_logged_loss, stop_step = 0.0, 0, float("nan"), args.iterations
    if args.resume_from:
        resumed = resume_training(args, rt, log, model, optimizers, loader)
        if resumed is not None:
            step, train_ms, ema = resumed
    checkpoints = Checkpointer(args, rt, log) if args.checkpoint_every or args.checkpoint_every_seconds else None
    checkpoint_due = False  # the clock's checkpoint request, as every rank read it from the vote
    router_window = router_last = None  # router figures summed since the last log line, and the latest sum
    moe_routing = moe_routing_started(model) if args.moe_enabled else False  # (a resumed run may have started it)
    recurrent = args.recurrence_start_fraction == 0  # depth recurrence runs (RECURRENCE_DEPTH > 0 only)
    synchronize()
    t0 = last_log = time.perf_counter()
    status.phase = "training"

    def check_vote() -> None:
        """Act on the decision posted for the previous step: fail on a non-finite loss, stop when time is up,
        checkpoint when CHECKPOINT_EVERY_SECONDS have passed, start the MoE routing."""
        nonlocal stop_step, checkpoint_due, moe_routing, recurrent
        decided = vote.take()
        if decided is None:
            return
        decided_step, reasons = decided
        if reasons["sigterm"]:
            if args.checkpoint_every or args.checkpoint_every_seconds:  # a pod being reclaimed keeps this step
                checkpoints.save(step, train_ms + 1000.0 * (time.perf_counter() - t0), model, optimizers, loader, ema)
            raise RunStopped(f"SIGTERM: every rank stopped after step {step}", signal.SIGTERM)
        if reasons["non_finite_loss"]:
            raise FloatingPointError(f"non-finite training loss at step {decided_step}; last logged train_loss:"
                                     f"{last_logged_loss:.4f}; lower the learning rates or enable GRAD_CLIP_NORM")
        if reasons["time_up"]:
            stop_step = min(stop_step, step)  # every rank reads the same vote, so every rank stops at this step
        checkpoint_due = checkpoint_due or reasons["checkpoint_due"]
        if args.moe_enabled and reasons["moe_start"] and not moe_routing and step < stop_step:  # (not after the end)
            start_moe_routing(model)
            moe_routing = True
            log(f"moe: routing starts at step {step} (voted at step {decided_step}), experts upcycled from expert 0")
        if args.recurrence_depth and reasons["recurrence_start"] and not recurrent:
            recurrent = True
            log(f"recurrence: depth {args.recurrence_depth} over layers {list(model.recurrence_band)} from step {step}")

    while True:
        if step == stop_step or (args.val_loss_every and step % args.val_loss_every == 0 and step > 0):
            synchronize()
            train_ms += 1000.0 * (time.perf_counter() - t0)
            check_vote()  # the last step's vote too: a non-finite loss never reaches the exported weights
            totals = reduce_scored(evaluate_windows(model, val_ctx, val_ctx.seq_len, rt,
                                                    progress=Progress(log, f"val step:{step}")), rt)
            log(f"{step_label(step, train_ms, args)} val_loss:{totals.val_loss:.4f} val_bpb:{totals.val_bpb:.4f} "
                f"train_time:{train_ms:.0f}ms step_avg:{train_ms / max(step, 1):.2f}ms")
            t0 = time.perf_counter()
        if step >= stop_step:
            break
        elapsed_ms = train_ms + 1000.0 * (time.perf_counter() - t0)
        step_ms = elapsed_ms / step if step else warmup_step_ms
        scale = lr_scale(step, elapsed_ms, args, step_ms)
        if args.recurrence_depth or args.feedback_passes:
            set_training_phase(model, args, step, recurrent)
        loss, router_stats = optimizer_step(compiled, model, loader, optimizers, args, rt, accum, micro_tokens, step,
                                            scale)
        if router_stats is not None:
            router_window = router_stats if router_window is None else router_window + router_stats
        step += 1
        if args.ema_decay > 0:
            if ema is None and training_progress(step, elapsed_ms, args) >= args.ema_start_frac:
                ema = WeightEMA(model, args.ema_decay)
            elif ema is not None:
                ema.update(model)
        status.step = step
        if step == 1:  # compiled and in lockstep from here on: a rank that stops answering fails the job soon
            set_collective_timeout(rt, args.dist_step_timeout_seconds)
        check_vote()
        if args.checkpoint_every or args.checkpoint_every_seconds:  # the last one too, inside the timed loop
            if (args.checkpoint_every and step % args.checkpoint_every == 0) or checkpoint_due or step == stop_step:
                checkpoints.save(step, train_ms + 1000.0 * (time.perf_counter() - t0), model, optimizers, loader, ema)
                checkpoint_due = False
        now = time.perf_counter()
        elapsed_ms = train_ms + 1000.0 * (now - t0)
        # The vote takes effect one step later: stop when the next step would end past the cap; start the MoE
        # routing once the training progress (the largest of the ranks' clocks) reaches MOE_START_FRACTION.
        vote.post(step, max_ms > 0 and elapsed_ms + elapsed_ms / step >= max_ms, loss, status.sigterm,
                  args.checkpoint_every_seconds > 0 and checkpoints.clock_due(),
                  moe_start=args.moe_enabled and training_progress(step, elapsed_ms, args) >= args.moe_start_fraction,
                  recurrence_start=args.recurrence_depth > 0 and training_progress(step, elapsed_ms, args) >=
                  args.recurrence_start_fraction)
        on_cadence = step % args.train_log_every == 0 or step == 1
        if on_cadence or (rt.is_main and now - last_log >= PROGRESS_SECONDS):
            last_log, last_logged_loss = now, float(loss)
            log(f"{step_label(step, elapsed_ms, args)} train_loss:{last_logged_loss:.4f} lr_scale:{scale:.3f} "
                f"tok_s:{step * tokens_per_step / (elapsed_ms / 1000.0):.0f} train_time:{elapsed_ms:.0f}ms "
                f"step_avg:{elapsed_ms / step:.2f}ms remaining:{max(max_ms - elapsed_ms, 0.0) / 1000.0:.0f}s")
        if args.moe_enabled and on_cadence and router_window is not None:  # every rank at the same steps: the all-reduce is collective
            router_last, router_window = rt.all_reduce(router_window), None
            for line in router_health_lines("router_health", router_last, step):
                log(line)
    set_collective_timeout(rt, args.dist_timeout_seconds)
    status.phase = "post-training"
    if status.sigterm:  # arrived after the last vote was posted (during the final validation)
        raise RunStopped(f"SIGTERM: stopped after the last step {step}", signal.SIGTERM)
    train_tok_s = step * tokens_per_step / max(train_ms / 1000.0, 1e-9)
    log(f"train_done steps:{step} train_time:{train_ms:.0f}ms tok_s:{train_tok_s:.0f}")
    if args.moe_enabled:
        if router_window is not None:
            router_last = rt.all_reduce(router_window)
        if router_last is None:
            log(f"WARNING: moe: routing never started (MOE_START_FRACTION={args.moe_start_fraction}); the model "
                "ran and is exported with expert 0 alone in each MoE layer")
        else:  # the figures of the last logging interval (a partial one when training stopped between log lines)
            for line in router_health_lines("router_health_final", router_last, step):
                log(line)
    log(f"peak_mem_mib:{peak_memory_mib(rt):.0f}")
    if args.checkpoint_every or args.checkpoint_every_seconds:
        checkpoints.report()
    if args.recurrence_depth or args.feedback_passes:
        set_training_phase(model, args, 0, recurrent=True)  # evaluation and the exported model run the full graph
    if args.ema_decay > 0 and ema is not None:
        ema.copy_to(model)
        log(f"ema: applied decay {args.ema_decay} weights")
    return {"steps": step, "train_ms": train_ms, "tok_s": train_tok_s}


# -----------------------------------------------------------------------------
# Calibration & export
# -----------------------------------------------------------------------------
# Calibration: a greedy per-tensor search over the ternary threshold and scale multiplier, scored by the loss
# of the quantized forward on training tokens. It reads training data, so it runs inside the training
# budget (train() stops CALIB_MAX_SECONDS early). Every rank scores its share of the same batch and one
# all-reduce per evaluation carries both the loss and the out-of-budget flag, so every rank takes every
# decision together and no rank waits in a collective the others skipped.
def calibration_batch(args: Hyperparameters, rt: Runtime) -> tuple[Tensor, Tensor]:
    """This rank's share of CALIB_TOKENS training tokens, from the start of the training stream."""
    local_tokens = max(args.train_seq_len, args.calib_tokens // rt.world_size // args.train_seq_len * args.train_seq_len)
    loader = DistributedTokenLoader(args.data_path, args.vocab_size, rt.rank, rt.world_size, rt.device)
    return loader.next_batch(local_tokens, args.train_seq_len)


# --- feature: calibration (CALIB_MAX_EVALS) ---
CALIB_THRESHOLDS = (0.4, 0.45, 0.55, 0.6, 0.7)
CALIB_SCALE_MULTS = (0.9, 0.95, 1.05, 1.1)


def calibrate_ternary(model: GPT, args: Hyperparameters, rt: Runtime, log: Logger) -> None:
    t0 = time.perf_counter()
    layers = sorted(((m.weight.numel(), name, m) for name, m in model.named_modules()
                     if isinstance(m, TernaryLinear) and m.weight.numel() >= args.calib_min_params),
                    key=lambda item: (-item[0], item[1]))
    x, y = calibration_batch(args, rt)
    evals = 0

    @torch.no_grad()
    def proxy_loss() -> tuple[float, bool]:
        nonlocal evals
        with rt.autocast():
            loss = token_losses(model(x), y).double().mean()
        elapsed = time.perf_counter() - t0
        # stop while one more evaluation (and the temperature fit, about one more) still fits the budget
        next_cost = elapsed / (evals + 1) * (2 if args.eval_temperature_fit else 1)
        out_of_time = elapsed + next_cost >= args.calib_max_seconds
        packed = rt.all_reduce(torch.stack((loss, torch.tensor(float(out_of_time), device=rt.device, dtype=torch.float64))))
        evals += 1
        return float(packed[0]) / rt.world_size, bool(packed[1] > 0) or evals >= args.calib_max_evals

    best, stop = proxy_loss()
    start_loss, changed = best, 0
    for _, name, layer in layers:
        for buffer, default, candidates in ((layer.threshold, 0.5, CALIB_THRESHOLDS),
                                            (layer.scale_mult, 1.0, CALIB_SCALE_MULTS)):
            kept = default
            for value in candidates:
                if stop:
                    break
                buffer.fill_(value)
                loss, stop = proxy_loss()
                if loss < best:
                    best, kept = loss, value
            buffer.fill_(kept)
            changed += kept != default
    if rt.distributed:  # decisions already agree; the broadcast makes the buffers bit-identical on every rank
        for _, _, layer in layers:
            dist.broadcast(layer.threshold, src=0)
            dist.broadcast(layer.scale_mult, src=0)
    log(f"calibration evals:{evals} tensors:{len(layers)} changed:{changed} proxy_loss:{start_loss:.4f}->{best:.4f} "
        f"time:{1000.0 * (time.perf_counter() - t0):.0f}ms")
# --- end feature: calibration ---


# --- feature: temperature_fit (EVAL_TEMPERATURE_FIT) ---
@torch.no_grad()
def fit_temperature(model: GPT, args: Hyperparameters, rt: Runtime, log: Logger) -> None:
    """Fit the logit temperature on training tokens (inside the training budget, never on validation):
    every rank scores the same grid on its share and one all-reduce picks the same T everywhere."""
    t0 = time.perf_counter()
    x, y = calibration_batch(args, rt)
    grid = torch.linspace(0.7, 1.3, 61, device=rt.device)
    model.logit_temperature.fill_(1.0)
    with rt.autocast():
        logits = model(x).float()
    losses = torch.stack([token_losses(logits / t, y).double().sum() for t in grid])
    best = float(grid[int(torch.argmin(rt.all_reduce(losses)))])
    model.logit_temperature.fill_(float(torch.tensor(best).to(torch.float16)))  # as the artifact stores it
    log(f"temperature_fit T:{float(model.logit_temperature):.4f} time:{1000.0 * (time.perf_counter() - t0):.0f}ms")
# --- end feature: temperature_fit ---


# Artifact layout (our own format; loading never unpickles or executes anything):
#   b"SKCG" | version u8 | codec u8 | payload length u32 | crc32 of the 10 bytes before it and the payload u32 | payload
# The decompressed payload is a u32 header length, a JSON header (model config and one record per tensor:
# name, encoding, shape, blob offsets) and the concatenated blobs. Loading checks everything it reads before it
# allocates: the checksum, the decompressed size, every blob's length against its shape, and the model config
# (settings in range, shapes equal to those of the model it describes).
ARTIFACT_MAGIC = b"SKCG"
ARTIFACT_VERSION = 2
ARTIFACT_HEADER_BYTES = 14
ARTIFACT_MAX_PAYLOAD_BYTES = 1 << 28  # far above any 16 MB artifact; a forged one stops here, not in memory
ARTIFACT_DTYPES = ("float16", "uint8", "int8")  # what the exporter stores
ARTIFACT_CODECS = ("brotli", "lzma", "zlib")
# Settings that shape the model; the artifact carries them so a loader rebuilds the same network.
MODEL_SETTINGS = ("NUM_LAYERS", "MODEL_DIM", "NUM_HEADS", "NUM_KV_HEADS", "MLP_MULT", "MLP_ACT", "EMBED_DIM",
                  "TIE_EMBEDDINGS", "ROPE_BASE", "ROPE_DIMS", "QK_NORM", "LOGIT_SOFTCAP", "SOFTCAP_TYPE", "WEIGHT_QUANT",
                  "TERNARY_GROUP_SIZE", "TERNARY_SCALE_FORMAT", "FP_STORAGE_SIM", "TURBO_QUANT_TRAIN", "EVAL_TEMPERATURE_FIT",
                  # feature: engram_hash
                  "ENGRAM_ENABLED", "ENGRAM_NUM_HEADS", "ENGRAM_NUM_ORDERS", "ENGRAM_BUCKETS", "ENGRAM_DIM", "ENGRAM_LAYER",
                  # feature: moe
                  "MOE_ENABLED", "MOE_NUM_EXPERTS", "MOE_TOP_K", "MOE_LAYER_FRAC", "MOE_ROUTER_TEMPERATURE",
                  # feature: xsa, vrl, smear_gate, ln_scale_damping
                  "XSA_LAST_N", "VRL_ENABLED", "SMEAR_GATE", "LN_SCALE_DAMPING",
                  # feature: skc_mixer, capsules, koopman, feedback_passes, shared_blocks, parallel_residual, recurrence
                  "ARCHITECTURE", "SKC_LAYERS", "SKC_CHUNK", "SKC_CONV_KERNEL", "CAPSULE_ENABLED", "CAPSULE_NUM",
                  "CAPSULE_DIM", "KOOPMAN_ENABLED", "KOOPMAN_RANK", "FEEDBACK_PASSES", "ADAPTIVE_HALT_ENABLED",
                  "ADAPTIVE_HALT_THRESHOLD", "SHARED_BLOCKS", "SKC_PARALLEL_RESIDUAL", "RECURRENCE_DEPTH",
                  "RECURRENCE_LAYERS")
CLIP_RATIOS = (1.0, 0.995, 0.99, 0.98, 0.96, 0.93, 0.9, 0.85, 0.8)


class ArtifactError(ValueError):
    """An artifact that is truncated, corrupt, or not ours."""


def compress(data: bytes, codec: str) -> bytes:
    if codec == "brotli":
        import brotli
        return brotli.compress(data, quality=11, lgwin=24)
    if codec == "lzma":
        return lzma.compress(data, preset=9 | lzma.PRESET_EXTREME)
    return zlib.compress(data, 9)


def decompress(data: bytes, codec: str, source: str) -> bytes:
    """The payload, refused when it does not decode or grows past ARTIFACT_MAX_PAYLOAD_BYTES."""
    limit = ARTIFACT_MAX_PAYLOAD_BYTES + 1
    try:
        if codec == "brotli":
            import brotli
            decoder = brotli.Decompressor()
            try:
                payload = decoder.process(data, output_buffer_limit=limit)
            except brotli.error as error:
                raise ValueError(error) from None
            complete = decoder.is_finished()
        elif codec == "lzma":
            decoder = lzma.LZMADecompressor()
            payload, complete = decoder.decompress(data, max_length=limit), decoder.eof
        else:
            decoder = zlib.decompressobj()
            payload, complete = decoder.decompress(data, limit), decoder.eof
    except (ValueError, lzma.LZMAError, zlib.error) as error:
        raise ArtifactError(f"{source}: its {codec} payload does not decode ({error})") from None
    if len(payload) >= limit:
        raise ArtifactError(f"{source}: its payload decompresses to more than {ARTIFACT_MAX_PAYLOAD_BYTES} bytes")
    if not complete:
        raise ArtifactError(f"{source}: its {codec} payload ends early (truncated before it was framed)")
    return payload


def resolve_codec(args: Hyperparameters) -> str:
    if args.export_format == "int8_zlib":
        return "zlib"
    if args.export_codec != "auto":
        return args.export_codec
    try:
        import brotli  # noqa: F401
        return "brotli"
    except ImportError:
        return "lzma"


def pack_trits(trits: np.ndarray, packing: str) -> bytes:
    """base3: 5 trits a byte (3^5 = 243 <= 256); 2bit: 4 trits a byte. Trits -1/0/1 are stored as 0/1/2."""
    digits = (trits.reshape(-1).astype(np.int16) + 1).astype(np.uint8)
    per_byte, radix = (5, 3) if packing == "base3" else (4, 4)
    digits = np.concatenate((digits, np.zeros(-digits.size % per_byte, dtype=np.uint8))).reshape(-1, per_byte)
    weights = (radix ** np.arange(per_byte)).astype(np.uint16)
    return (digits.astype(np.uint16) * weights).sum(axis=1).astype(np.uint8).tobytes()


def unpack_trits(data: bytes, count: int, packing: str) -> np.ndarray:
    per_byte, radix = (5, 3) if packing == "base3" else (4, 4)
    packed = np.frombuffer(data, dtype=np.uint8).astype(np.int16)
    if packed.size != -(-count // per_byte):
        raise ArtifactError(f"trit blob holds {packed.size} bytes, expected {-(-count // per_byte)} for {count} trits")
    digits = (packed[:, None] // (radix ** np.arange(per_byte))) % radix
    return (digits.reshape(-1)[:count] - 1).astype(np.int8)


def pack_nibbles(codes: np.ndarray) -> bytes:
    flat = codes.reshape(-1).astype(np.uint8)
    flat = np.concatenate((flat, np.zeros(flat.size % 2, dtype=np.uint8)))
    return (flat[0::2] | (flat[1::2] << 4)).tobytes()


def unpack_nibbles(data: bytes, count: int) -> np.ndarray:
    packed = np.frombuffer(data, dtype=np.uint8)
    return np.stack((packed & 15, packed >> 4), axis=1).reshape(-1)[:count]


def encode_rows(w: Tensor, fmt: str, clip: float) -> tuple[Tensor, Tensor]:
    """(codes, fp16-exact per-row scales) for fp8, fp4 or int8 storage of a 2-D tensor."""
    if fmt == "int8":
        scale = fp16_scale(w.abs().amax(dim=-1, keepdim=True) * clip / 127.0)
        return (w / scale).round().clamp(-127, 127).to(torch.int8), scale
    scale = fp_row_scale(w, fmt, clip)
    return (fp8_encode(w, scale) if fmt == "fp8" else fp4_encode(w, scale)), scale


def decode_rows(codes: Tensor, scale: Tensor, fmt: str) -> Tensor:
    if fmt == "int8":
        return codes.float() * scale
    return fp8_decode(codes, scale) if fmt == "fp8" else fp4_decode(codes, scale)


def best_clip(w: Tensor, fmt: str, search: bool) -> float:
    """GPTQ-lite: the clip ratio whose round trip is closest (squared error) to the original tensor."""
    if not search:
        return 1.0
    errors = [(float((decode_rows(*encode_rows(w, fmt, c), fmt) - w).square().sum()), c) for c in CLIP_RATIOS]
    return min(errors)[1]


class TensorRecord(NamedTuple):
    name: str
    encoding: str  # ternary | fp8 | fp4 | int8 | fp16
    shape: tuple[int, ...]
    arrays: dict[str, np.ndarray]  # the stored numbers, before trit/nibble packing
    meta: dict


def encode_tensor(name: str, t: Tensor, module: nn.Module | None, role: str | None, args: Hyperparameters) -> TensorRecord:
    """One tensor's record; `role` is None for a buffer (kept in fp16)."""
    t = t.detach().float().cpu()
    shape = tuple(t.shape)
    if isinstance(module, TernaryLinear) and args.export_format == "ternary":
        weight = module.weight
        if args.turbo_quant_export and not isinstance(module, RotatedTernaryLinear):  # the loaded layer rotates to match
            weight = rotate_blocks(weight.detach(), hadamard_matrix(module.group_size))
        trits, scales = module.quantized(weight)
        arrays = {"trits": trits.cpu().numpy()}
        meta = {"group_size": module.group_size, "scale_format": module.scale_format}
        if module.scale_format == "fp16":
            arrays["scales"] = scales.cpu().to(torch.float16).numpy()
        else:
            factor = fp8_scale_factor(scales)
            arrays["scales"] = fp8_encode(scales.cpu(), factor.cpu()).view(torch.uint8).numpy()
            meta["scale_factor"] = float(factor)
        return TensorRecord(name, "ternary", shape, arrays, meta)
    fmt = storage_format(name, role, t.numel(), args)
    if fmt == "fp16":
        return TensorRecord(name, "fp16", shape, {"values": t.to(torch.float16).numpy()}, {})
    clip = best_clip(t, fmt, args.export_clip_search) if fmt == "int8" else 1.0  # fp8/fp4: stored as trained
    codes, scale = encode_rows(t, fmt, clip)
    codes = codes.view(torch.uint8) if fmt == "fp8" else codes
    return TensorRecord(name, fmt, shape, {"codes": codes.numpy(), "scales": scale.to(torch.float16).numpy()},
                        {"clip": clip})


def encode_model(model: GPT, args: Hyperparameters) -> list[TensorRecord]:
    owners = {f"{prefix}.weight" if prefix else "weight": m for prefix, m in model.named_modules()
              if isinstance(m, TernaryLinear)}
    roles = parameter_roles(model)
    return [encode_tensor(name, t, owners.get(name), roles.get(name), args) for name, t in model.state_dict().items()]


def decode_tensor(record: TensorRecord) -> tuple[Tensor, Tensor | None]:
    """(dequantized tensor, exact ternary scales or None)."""
    a = record.arrays
    if record.encoding == "fp16":
        return torch.from_numpy(a["values"].astype(np.float32)).reshape(record.shape), None
    if record.encoding == "ternary":
        if record.meta["scale_format"] == "fp16":
            scales = torch.from_numpy(a["scales"].astype(np.float32))
        else:
            scales = fp8_decode(torch.from_numpy(a["scales"].copy()).view(torch.float8_e4m3fn),
                                torch.tensor(record.meta["scale_factor"]))
        trits = torch.from_numpy(a["trits"].astype(np.int8)).reshape(record.shape)
        return ternary_dequantize(trits, scales, record.meta["group_size"]), scales
    codes = torch.from_numpy(a["codes"].copy()).reshape(record.shape)
    codes = codes.view(torch.float8_e4m3fn) if record.encoding == "fp8" else codes
    return decode_rows(codes, torch.from_numpy(a["scales"].astype(np.float32)), record.encoding), None


def serialize_records(records: list[TensorRecord], config: dict, packing: str) -> tuple[bytes, dict[str, list[bytes]]]:
    """The uncompressed payload, and its blobs grouped by component (for the size report)."""
    blobs, entries = [], []
    components: dict[str, list[bytes]] = {"ternary_trits": [], "ternary_scales": [], "fp_codes": [], "fp_scales": [],
                                          "fp16": []}
    offset = 0
    for r in records:
        fields = {}
        for key, array in r.arrays.items():
            if key == "trits":
                data, component = pack_trits(array, packing), "ternary_trits"
            elif key == "codes" and r.encoding == "fp4":
                data, component = pack_nibbles(array), "fp_codes"
            else:
                data = np.ascontiguousarray(array).tobytes()
                component = {"scales": "ternary_scales" if r.encoding == "ternary" else "fp_scales",
                             "codes": "fp_codes", "values": "fp16"}[key]
            fields[key] = [offset, len(data), str(array.dtype), list(array.shape)]
            blobs.append(data)
            offset += len(data)
            components[component].append(data)
        entries.append({"name": r.name, "encoding": r.encoding, "shape": list(r.shape), "fields": fields, "meta": r.meta})
    header = json.dumps({"config": config, "packing": packing, "tensors": entries}, sort_keys=True,
                        separators=(",", ":")).encode()
    return len(header).to_bytes(4, "little") + header + b"".join(blobs), {**components, "header": [header]}


def blob_bytes(key: str, encoding: str, count: int, dtype: str, packing: str) -> int:
    """How many bytes a stored array of `count` numbers takes: packed trits, packed fp4 nibbles, or plain."""
    if key == "trits":
        return -(-count // (5 if packing == "base3" else 4))
    if key == "codes" and encoding == "fp4":
        return -(-count // 2)
    return count * np.dtype(dtype).itemsize


def checked_shape(shape) -> list[int]:
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise ArtifactError(f"a tensor shape {shape!r} is not a list of sizes")
    return shape


def deserialize_records(payload: bytes) -> tuple[dict, list[TensorRecord]]:
    """The config and tensor records; every blob's length is checked against its shape before it is read."""
    try:
        header_len = int.from_bytes(payload[:4], "little")
        if header_len > len(payload) - 4:
            raise ArtifactError(f"header length {header_len} runs past the end of the payload")
        header = json.loads(payload[4:4 + header_len])
        body = memoryview(payload)[4 + header_len:]
        if header["packing"] not in ("base3", "2bit") or not isinstance(header["config"], dict):
            raise ArtifactError("header has no valid packing or config")
        records = []
        for e in header["tensors"]:
            arrays = {}
            for key, (offset, length, dtype, shape) in e["fields"].items():
                if dtype not in ARTIFACT_DTYPES:
                    raise ArtifactError(f"tensor {e['name']} has dtype {dtype!r}, not one of {ARTIFACT_DTYPES}")
                count = math.prod(checked_shape(shape))
                expected = blob_bytes(key, e["encoding"], count, dtype, header["packing"])
                if not (isinstance(offset, int) and offset >= 0 and length == expected and offset + length <= len(body)):
                    raise ArtifactError(f"tensor {e['name']} field {key} claims {length} bytes at offset {offset}; its "
                                        f"shape {shape} needs {expected}, inside a body of {len(body)}")
                data = bytes(body[offset:offset + length])
                if key == "trits":
                    arrays[key] = unpack_trits(data, count, header["packing"]).reshape(shape)
                elif key == "codes" and e["encoding"] == "fp4":
                    arrays[key] = unpack_nibbles(data, count).reshape(shape)
                else:
                    arrays[key] = np.frombuffer(data, dtype=np.dtype(dtype)).reshape(shape)
            records.append(TensorRecord(e["name"], e["encoding"], tuple(checked_shape(e["shape"])), arrays, e["meta"]))
        return header["config"], records
    except (ValueError, KeyError, TypeError) as error:
        raise ArtifactError(f"artifact payload is corrupt: {error}") from None


def frame_artifact(payload: bytes, codec: str) -> bytes:
    body = compress(payload, codec)
    head = ARTIFACT_MAGIC + bytes((ARTIFACT_VERSION, ARTIFACT_CODECS.index(codec))) + len(body).to_bytes(4, "little")
    return head + zlib.crc32(head + body).to_bytes(4, "little") + body


def unframe_artifact(blob: bytes, source: str) -> bytes:
    if len(blob) < ARTIFACT_HEADER_BYTES or blob[:4] != ARTIFACT_MAGIC:
        raise ArtifactError(f"{source} is not an skc-golf artifact (bad magic or shorter than its "
                            f"{ARTIFACT_HEADER_BYTES}-byte header)")
    if blob[4] != ARTIFACT_VERSION:
        raise ArtifactError(f"{source} has artifact format version {blob[4]}; this trainer reads version "
                            f"{ARTIFACT_VERSION}: export it again with this train_gpt.py")
    length, crc = int.from_bytes(blob[6:10], "little"), int.from_bytes(blob[10:14], "little")
    body = blob[ARTIFACT_HEADER_BYTES:]
    if len(body) < length:
        raise ArtifactError(f"{source} is truncated: its header says {length} payload bytes, the file has {len(body)}")
    if len(body) > length:
        raise ArtifactError(f"{source} has {len(body) - length} bytes after its {length}-byte payload: something was "
                            "appended to the file, or it is not the file the trainer wrote")
    if zlib.crc32(blob[:10] + body) != crc or blob[5] >= len(ARTIFACT_CODECS):
        raise ArtifactError(f"{source} is corrupt: checksum mismatch over its header and payload")
    return decompress(body, ARTIFACT_CODECS[blob[5]], source)


def export_name(args: Hyperparameters) -> str:
    return "int8_zlib" if args.export_format == "int8_zlib" else f"ternary_{resolve_codec(args)}"


def artifact_config(args: Hyperparameters, vocab_size: int) -> dict:
    config = {name: getattr(args, name.lower()) for name in MODEL_SETTINGS}
    config["VOCAB_SIZE"] = vocab_size
    config["EXPORT_NAME"] = export_name(args)
    config["TURBO_QUANT_TRAIN"] = args.turbo_quant_train or (args.turbo_quant_export and args.export_format == "ternary")
    return config


class ExportResult(NamedTuple):
    blob: bytes
    packing: str
    codec: str
    components: dict[str, list[bytes]]
    records: list[TensorRecord]


def export_model(model: GPT, args: Hyperparameters, log: Logger) -> ExportResult:
    """Encode, then frame with each trit packing and keep the smaller artifact."""
    records = encode_model(model, args)
    codec = resolve_codec(args)
    has_trits = any(r.encoding == "ternary" for r in records)
    candidates = []
    for packing in ("base3", "2bit") if has_trits else ("base3",):
        payload, components = serialize_records(records, artifact_config(args, model.tok_emb.num_embeddings), packing)
        candidates.append((len(blob := frame_artifact(payload, codec)), packing, blob, components))
    if has_trits:
        log("trit_packing " + " ".join(f"{p}:{n}" for n, p, _, _ in candidates) +
            f" -> {min(candidates)[1]} (smaller compressed artifact)")
    size, packing, blob, components = min(candidates)
    return ExportResult(blob, packing, codec, components, records)


def artifact_model_args(config: dict, args: Hyperparameters) -> Hyperparameters:
    """`args` with the model settings an artifact carries, each checked as strictly as an environment value (type,
    range, choices, relations), so that a forged config fails here, before anything is allocated."""
    values = {}
    for name in MODEL_SETTINGS + ("VOCAB_SIZE",):
        if name not in config:
            raise ArtifactError(f"the artifact's config lacks {name}: it is not a file this trainer wrote")
        value, setting = config[name], Hyperparameters.SETTINGS[name]
        kind = type(setting.default)
        accepted = (int, float) if kind is float else kind
        if isinstance(value, bool) != (kind is bool) or not isinstance(value, accepted):
            raise ArtifactError(f"the artifact's config has {name}={value!r}, not a {kind.__name__}")
        try:
            values[name] = _parse_setting(name, str(value), setting)
        except ConfigError as error:
            raise ArtifactError(f"the artifact's config is invalid: {error}") from None
    try:
        model_args = args.replace(values)  # checks the relations too
    except ConfigError as error:
        raise ArtifactError(f"the artifact's config is invalid: {error}") from None
    if model_args.vocab_size < 2:
        raise ArtifactError(f"the artifact's config has VOCAB_SIZE={model_args.vocab_size}")
    if not re.fullmatch(r"\w{1,40}", str(config.get("EXPORT_NAME", "artifact"))):  # it names a log line
        raise ArtifactError(f"the artifact's config has EXPORT_NAME={config['EXPORT_NAME']!r}, not a short word")
    return model_args


def check_record_shapes(model_args: Hyperparameters, records: list[TensorRecord]) -> None:
    """The records must hold exactly the tensors of the model the config describes. The model is built on the meta
    device (no memory), so a config that asks for a huge network fails here instead of allocating it."""
    with torch.device("meta"):
        expected = {name: tuple(t.shape) for name, t in GPT(model_args, model_args.vocab_size).state_dict().items()}
    stored = {record.name: record.shape for record in records}
    wrong = sorted(name for name in expected.keys() | stored.keys() if expected.get(name) != stored.get(name))
    if wrong:
        details = ", ".join(f"{name}: config {expected.get(name)} stored {stored.get(name)}" for name in wrong[:5])
        raise ArtifactError(f"the artifact's tensors do not match the model its config describes ({len(wrong)} "
                            f"differ; {details}): it is corrupt or was not written by this trainer")


def model_from_records(config: dict, records: list[TensorRecord], args: Hyperparameters) -> GPT:
    """A fresh model holding exactly the records' weights; ternary layers keep the stored scales.
    Settings the artifact does not carry (evaluation, attention backend) come from `args`."""
    model_args = artifact_model_args(config, args)
    check_record_shapes(model_args, records)
    model = GPT(model_args, model_args.vocab_size)
    owners = {f"{prefix}.weight": m for prefix, m in model.named_modules() if isinstance(m, TernaryLinear)}
    state = {}
    for record in records:
        try:
            tensor, scales = decode_tensor(record)
            state[record.name] = tensor
            if scales is not None:
                owners[record.name].fixed_scales = scales
        except (RuntimeError, ValueError, KeyError, TypeError, ArithmeticError) as error:
            raise ArtifactError(f"tensor {record.name} of the artifact does not decode ({error!r})") from None
    model.load_state_dict(state)
    model.simulate_storage(None)
    model.export_name = config.get("EXPORT_NAME", "artifact")  # names the round-trip line, e.g. ternary_brotli
    return model


def load_artifact(blob: bytes, source: str, args: Hyperparameters) -> GPT:
    config, records = deserialize_records(unframe_artifact(blob, source))
    return model_from_records(config, records, args)


def component_report(result: ExportResult) -> list[str]:
    """Raw bytes per component and what each compresses to on its own (the levers for the size budget)."""
    raw, packed = [], []
    for name, parts in result.components.items():
        data = b"".join(parts)
        raw.append(f"{name}:{len(data)}")
        packed.append(f"{name}:{len(compress(data, result.codec)) if data else 0}")
    return ["artifact_components_raw_bytes " + " ".join(raw),
            f"artifact_components_{result.codec}_bytes " + " ".join(packed) + " (each compressed alone)"]


def largest_tensors(records: list[TensorRecord], count: int = 10) -> list[str]:
    sizes = sorted(((sum(a.nbytes for a in r.arrays.values()), r.name, r.encoding) for r in records), reverse=True)
    return [f"  {name} ({encoding}): {size} bytes before packing and compression" for size, name, encoding in sizes[:count]]


def account_artifact(result: ExportResult, code_bytes: int, args: Hyperparameters, log: Logger) -> None:
    """Code + model bytes against the decimal cap; in submission mode an artifact over cap - margin fails."""
    total = code_bytes + len(result.blob)
    headroom = args.size_cap_bytes - total
    log(f"artifact code_bytes:{code_bytes} model_bytes:{len(result.blob)} total_bytes:{total} "
        f"cap_bytes:{args.size_cap_bytes} headroom_bytes:{headroom} margin_bytes:{args.size_margin_bytes}")
    if headroom >= args.size_margin_bytes:
        return
    message = (f"artifact total {total} bytes leaves {headroom} bytes under the {args.size_cap_bytes}-byte cap, "
               f"less than SIZE_MARGIN_BYTES={args.size_margin_bytes}; the largest tensors:\n"
               + "\n".join(largest_tensors(result.records)))
    if args.submission_mode:
        raise ArtifactError(message + "\nshrink the model (MODEL_DIM, NUM_LAYERS, MLP_MULT) or its fp parameters")
    log("WARNING: " + message)


# -----------------------------------------------------------------------------
# Evaluation
# -----------------------------------------------------------------------------
# The validation stream v[0..N] has N targets: target t is v[t], predicted from v[0..t-1]. Every mode
# scores each target exactly once, through one function (score_windows), with a full normalised softmax.
# The legality rules this code keeps (and tests/test_eval_legality.py proves): the prediction of target t
# depends only on the artifact and v[0..t-1]; a target is scored before any update (TTT step, EvalEngram
# count) that uses it; each target is scored once; no state crosses a BOS where it must reset.
class EvalTotals(NamedTuple):
    loss_nats: float  # sum of per-target cross-entropy, float64
    targets: int
    bytes: int

    @property
    def val_loss(self) -> float:
        return self.loss_nats / self.targets

    @property
    def val_bpb(self) -> float:
        return self.loss_nats / math.log(2.0) / self.bytes


class Window(NamedTuple):
    start: int  # inputs v[start:start+L] predict targets start+1 .. start+L
    first: int  # scored targets are first .. end-1
    end: int


def plan_windows(lo: int, hi: int, num_targets: int, seq_len: int, stride: int) -> list[Window]:
    """Windows of seq_len inputs that score targets lo..hi-1 once each, `stride` new targets a window, each with
    at least seq_len - stride tokens of context when the stream has them. stride == seq_len is plain chunking."""
    windows, pos = [], lo
    while pos < hi:
        start = max(0, min(pos - 1 - (seq_len - stride), num_targets - seq_len))
        end = min(start + seq_len + 1, hi)
        windows.append(Window(start, pos, end))
        pos = end
    return windows


# --- feature: eval_engram (EVAL_ENGRAM) ---
EVAL_ENGRAM_KEY_PRIME = 2**31 - 1


class EvalEngram:
    """N-gram memory of the validation stream, built only from tokens already scored.

    Target t is predicted with the counts of (context, next token) over every target before t: the table holds
    the earlier scoring calls, and within a call each row adds the rows before it (targets come in ascending
    order). Contexts never reach past the most recent BOS: tokens of an earlier document become a padding id.
    The smoothed n-gram distribution q joins the model's p through a gate that opens with the model's entropy:
    EVAL_ENGRAM_MIX=linear takes (1 - gate) p + gate q, a distribution as it stands; log adds gate * log q to
    log p and renormalises (a full softmax), so a sharp q there takes log-odds from every token it never saw.

    The distribution is the top order's counts, Laplace-smoothed (EVAL_ENGRAM_ALPHA per token). With
    EVAL_ENGRAM_BACKOFF = b > 0 every order from 2 up counts, and order k smooths towards order k-1 instead:
    q_k = (c_k + b q_{k-1}) / (n_k + b), the bigram smoothed as above. A context seen a few times then sharpens
    what its shorter suffix predicts rather than a uniform guess.
    """

    def __init__(self, args: Hyperparameters, vocab_size: int, device: torch.device):
        self.order, self.vocab_size = args.eval_engram_order, vocab_size
        self.orders = list(range(2, self.order + 1)) if args.eval_engram_backoff > 0 else [self.order]
        self.buckets = [vocab_size + 1 if k == 2 else args.eval_engram_buckets for k in self.orders]
        self.alpha, self.weight, self.center = args.eval_engram_alpha, args.eval_engram_weight, args.eval_engram_center
        self.backoff, self.linear = args.eval_engram_backoff, args.eval_engram_mix == "linear"
        self.counts = [torch.zeros(b, vocab_size, device=device) for b in self.buckets]  # exact below 2**24

    def context_keys(self, val: Tensor, last_bos: Tensor, targets: Tensor) -> list[Tensor]:
        """The bucket of each target's context, one tensor per order counted (lowest first). A context is its
        tokens in base vocab_size + 1 (the padding id included), reduced modulo a prime below 2**31 so that
        longer contexts cannot overflow: exact while (vocab_size + 1) ** (order - 1) stays under the prime."""
        key, keys = torch.zeros_like(targets), []
        for back in range(1, self.order):
            pos = targets - back
            token = torch.where((pos >= 0) & (pos >= last_bos[(targets - 1).clamp_min(0)]), val[pos.clamp_min(0)],
                                torch.full_like(targets, self.vocab_size))
            key = (key * (self.vocab_size + 1) + token) % EVAL_ENGRAM_KEY_PRIME
            if back + 1 in self.orders:
                keys.append(key % self.buckets[self.orders.index(back + 1)])
        return keys

    def earlier_rows(self, keys: Tensor, tokens: Tensor) -> Tensor:
        """[rows, vocab]: how often each token followed the row's context in the rows before it. Sorted by
        bucket (stably, so in target order), a row's earlier rows of the same bucket are the ones just above it."""
        order = torch.sort(keys, stable=True).indices
        sorted_keys, onehot = keys[order], F.one_hot(tokens[order], self.vocab_size).float()
        above = onehot.cumsum(0) - onehot
        rows = torch.arange(keys.numel(), device=keys.device)
        new_bucket = torch.ones_like(sorted_keys, dtype=torch.bool)
        new_bucket[1:] = sorted_keys[1:] != sorted_keys[:-1]
        bucket_start = torch.cummax(torch.where(new_bucket, rows, 0), dim=0).values
        earlier = torch.empty_like(above)
        earlier[order] = above - above[bucket_start]
        return earlier

    def absorb(self, keys: list[Tensor], tokens: Tensor) -> None:
        """Count each (context bucket, token) pair: keys from context_keys, tokens the targets' ids."""
        ones = torch.ones_like(tokens, dtype=torch.float32)
        for bucket, counts in zip(keys, self.counts):
            counts.index_put_((bucket, tokens), ones, accumulate=True)

    def mix(self, logp: Tensor, keys: list[Tensor], tokens: Tensor) -> Tensor:
        """The mixed log-distribution of each target (ascending, each once) from the counts before it."""
        q = None
        for bucket, counts in zip(keys, self.counts):
            seen = counts[bucket] + self.earlier_rows(bucket, tokens)
            total = seen.sum(-1, keepdim=True)
            if q is None:
                q = (seen + self.alpha) / (total + self.alpha * self.vocab_size)
            else:
                q = (seen + self.backoff * q) / (total + self.backoff)
        entropy = -(logp.exp() * logp).sum(-1, keepdim=True)
        gate = self.weight * torch.sigmoid(entropy - self.center)
        if self.linear:
            return torch.log((1.0 - gate) * logp.exp() + gate * q)
        return torch.log_softmax(logp + gate * torch.log(q), dim=-1)

    def score(self, logp: Tensor, val: Tensor, last_bos: Tensor, targets: Tensor) -> Tensor:
        """mix, then count the targets just scored for every later call (their keys computed once for both)."""
        keys, tokens = self.context_keys(val, last_bos, targets), val[targets]
        mixed = self.mix(logp, keys, tokens)
        self.absorb(keys, tokens)
        return mixed
# --- end feature: eval_engram ---


# --- feature: capsule_carry (CAPSULE_CARRY) ---
CARRY_SCAN_CHUNK = 64  # sequential steps of the carry's scan inside a chunk (document_scan)


class CapsuleCarry:
    """CAPSULE_CARRY: a window's capsule sums also count its document's positions before the window, weighted by
    CAPSULE_CARRY_DECAY per position of distance from the window's start, so a window that starts inside a long
    document still reads a summary of its beginning. One object per scoring pass: it keeps its state from batch to
    batch and, in score-first evaluation, from chunk to chunk.

    A position's contribution comes from the encoder (which never reads capsule state) of the window that scored
    its target, or, for the context of the pass's first window, of that window. A window's carry counts only
    positions before its first input and of its own document (a BOS empties it), so it reads only earlier tokens;
    every encoder of a batch runs before any decoder, so a window's carry also counts the windows batched before
    it, and the carries, like the score, do not depend on the batch size. Each rank starts empty at its first
    window (as TTT starts each rank from the artifact).

    Which positions the carry sums stops at a BOS; what a position contributes does not on the attention model,
    whose attention (like the official model's) reads the whole window, earlier documents included: the carry
    then brings that content into later windows. Every such token is earlier and already scored, so this is
    causal; it is document-local only where no layer attends (ARCHITECTURE=skc, tested for BOS locality)."""

    def __init__(self, ctx: StreamContext, decay: float):
        self.last_bos, self.log_decay = ctx.last_bos, math.log(decay)
        self.folded = 0  # positions before `folded` are summed into `state` (set by the first batch)
        self.state: Tensor | None = None  # [F]: sum over positions p < folded of the document, decay^(folded-1-p)
        self.pending: Tensor | None = None  # [n, F]: contributions of positions folded .. folded+n-1, not yet summed

    def forward_context(self, windows: list[Window]) -> ForwardContext:
        ctx = ForwardContext()
        ctx.capsule_carry = lambda parts: self.carry(windows, parts)
        return ctx

    def carry(self, windows: list[Window], parts: Tensor) -> Tensor:
        """The carried sums [B, T, F] of the batch `windows` (each window's carry at its positions before the
        window's first BOS, zero from there on), from the batch's contributions `parts` [B, T, F]."""
        if self.pending is None:
            self.folded, self.state = windows[0].start, parts.new_zeros(parts.size(-1))
            self.pending = parts.new_zeros(0, parts.size(-1))
        rows, held_to = [self.pending], self.folded + self.pending.size(0)
        for i, w in enumerate(windows):  # each window's positions not yet held: its scored inputs
            if not w.start <= held_to < w.end - 1:
                raise RuntimeError(f"CAPSULE_CARRY: a window at {w.start} after positions up to {held_to}: the "
                                   "windows of a pass must score the stream in order")
            rows.append(parts[i, held_to - w.start:w.end - 1 - w.start])
            held_to = w.end - 1
        self.pending = torch.cat(rows)
        starts = torch.tensor([w.start for w in windows], device=parts.device)
        span = windows[-1].start - self.folded
        sums = self.state[None]  # row k: the sums over the positions before folded + k
        if span:
            positions = torch.arange(self.folded, self.folded + span, device=parts.device)
            last_bos = self.last_bos[positions]
            scanned = document_scan(self.pending[None, :span], torch.full_like(self.state, self.log_decay),
                                    (last_bos - self.folded).clamp_min(0)[None], CARRY_SCAN_CHUNK)[0]
            kept = torch.exp((positions - self.folded + 1) * self.log_decay) * (last_bos < self.folded)  # same document
            sums = torch.cat((sums, scanned + kept.unsqueeze(-1) * self.state))
        sums = sums[starts - self.folded]  # [B, F]
        self.state, self.folded, self.pending = sums[-1], windows[-1].start, self.pending[span:]
        offsets = torch.arange(parts.size(1), device=parts.device)
        before_any_bos = self.last_bos[starts[:, None] + offsets] < starts[:, None]
        return before_any_bos.unsqueeze(-1) * sums[:, None, :]
# --- end feature: capsule_carry ---


def window_hidden(model: GPT, input_ids: Tensor) -> Tensor:
    return model.hidden_states(input_ids)


def row_losses(model: GPT, rows: Tensor, targets: Tensor) -> Tensor:
    return token_losses(model.logits(rows), targets)


class ScoringForward(NamedTuple):
    """The two calls of a scoring pass: hidden states of a batch of windows, then the losses of the rows kept.
    Compiled, each takes the model as an argument, so its graphs serve the trained model, the reloaded artifact
    and TTT's copy of it; hidden runs on one fixed shape (score_windows pads the last batch), losses on any
    number of rows (sliding windows keep a varying count)."""
    hidden: Callable[[GPT, Tensor], Tensor]
    losses: Callable[[GPT, Tensor, Tensor], Tensor]
    compiled: bool


EAGER_SCORING = ScoringForward(window_hidden, row_losses, False)


def scoring_forward(compiled: bool) -> ScoringForward:
    if not compiled:
        return EAGER_SCORING
    return ScoringForward(torch.compile(window_hidden, dynamic=False), torch.compile(row_losses, dynamic=True), True)


class StreamContext(NamedTuple):
    """The validation stream on the device, with what every scoring pass needs beside the model."""
    val: Tensor  # int64 [N+1]
    last_bos: Tensor  # index of the most recent BOS at or before each position (-1 before the first)
    tables: ByteTables
    seq_len: int
    batch_windows: int
    forward: ScoringForward = EAGER_SCORING

    @property
    def num_targets(self) -> int:
        return self.val.numel() - 1


def stream_context(val_tokens: np.ndarray, tables: ByteTables, seq_len: int, batch_tokens: int, rt: Runtime,
                   compiled: bool = False) -> StreamContext:
    """compiled: score through torch.compile'd forwards (MODEL_COMPILE; on by default on CUDA)."""
    val = torch.from_numpy(val_tokens.astype(np.int64)).to(rt.device)
    positions = torch.arange(val.numel(), device=rt.device)
    last_bos = torch.cummax(torch.where(val == BOS_ID, positions, torch.full_like(positions, -1)), dim=0).values
    return StreamContext(val, last_bos, tables, seq_len, max(1, batch_tokens // (rt.world_size * seq_len)),
                         scoring_forward(compiled))


@torch.no_grad()
def score_windows(model: GPT, ctx: StreamContext, windows: list[Window], rt: Runtime, engram: EvalEngram | None = None,
                  observer=None, progress: Progress | None = None, carry: CapsuleCarry | None = None) -> Tensor:
    """Per-target losses (nats, float32) of the windows' scored targets, in target order.
    observer(targets, log_probs), when given, sees every scored row's full log-distribution.
    A batch's inputs are one gather and its scored rows one index (all but plain chunking keep only each
    window's new targets); the index arithmetic runs on the host, on window bounds only."""
    losses = []
    span = np.arange(ctx.seq_len)
    offsets = torch.arange(ctx.seq_len, device=rt.device)
    args = model.args
    compiled = ctx.forward.compiled and not args.capsule_carry  # (the carry's state changes from batch to batch: eager)
    for i in range(0, len(windows), ctx.batch_windows):
        group = windows[i:i + ctx.batch_windows]
        padding = ctx.batch_windows - len(group) if compiled else 0  # one shape, one compiled graph
        starts = torch.tensor([w.start for w in group] + [group[-1].start] * padding, device=rt.device)
        inputs = ctx.val[starts[:, None] + offsets]
        with rt.autocast():
            if args.capsule_carry:
                hidden = model.hidden_states(inputs, carry.forward_context(group))
            else:
                hidden = ctx.forward.hidden(model, inputs)[:len(group)]
        rows = hidden.reshape(-1, hidden.size(-1))
        starts = starts[:len(group)]
        targets = (starts[:, None] + 1 + offsets).reshape(-1)
        first = np.array([w.first - w.start - 1 for w in group])[:, None]
        end = np.array([w.end - w.start - 1 for w in group])[:, None]
        keep = ((span >= first) & (span < end)).reshape(-1)
        if not keep.all() or ctx.forward.compiled:  # compiled: always a gathered copy, never a view (one graph)
            index = torch.from_numpy(np.flatnonzero(keep)).to(rt.device)
            rows, targets = rows[index], targets[index]
        if engram is None and observer is None:
            with rt.autocast():
                losses.append(ctx.forward.losses(model, rows, ctx.val[targets]))
        else:
            with rt.autocast():
                logp = torch.log_softmax(model.logits(rows).float(), dim=-1)
            if engram is not None:
                logp = engram.score(logp, ctx.val, ctx.last_bos, targets)
            if observer is not None:
                observer(targets, logp)
            losses.append(-logp.gather(-1, ctx.val[targets].unsqueeze(-1)).squeeze(-1))
        if progress is not None:
            progress.advance(int(keep.sum()))
    return torch.cat(losses) if losses else torch.zeros(0, device=rt.device)


class ScoredTargets(NamedTuple):
    """What a rank scored: target indices, their losses and byte counts."""
    targets: Tensor
    losses: Tensor
    nbytes: Tensor


def scored(ctx: StreamContext, lo: int, hi: int, losses: Tensor) -> ScoredTargets:
    targets = torch.arange(lo, hi, device=ctx.val.device)
    return ScoredTargets(targets, losses, ctx.tables.target_bytes(ctx.val[targets - 1], ctx.val[targets]))


def evaluate_windows(model: GPT, ctx: StreamContext, stride: int, rt: Runtime, observer=None,
                     progress: Progress | None = None) -> ScoredTargets:
    """Plain (stride == seq_len) or sliding-window scoring. The global window list is fixed first and then cut
    into contiguous shares, so the windows, and the score, do not depend on the world or batch size. The one
    exception is CAPSULE_CARRY: each rank's carry starts empty at its share's first window (see CapsuleCarry), so
    a carried score holds for the world size it was measured with."""
    windows = plan_windows(1, ctx.num_targets + 1, ctx.num_targets, ctx.seq_len, stride)
    mine = windows[len(windows) * rt.rank // rt.world_size:len(windows) * (rt.rank + 1) // rt.world_size]
    if progress is not None:
        progress.total = sum(w.end - w.first for w in mine)
    was_training = model.training
    model.eval()
    args = model.args  # the model's settings and this run's evaluation settings
    carry = CapsuleCarry(ctx, args.capsule_carry_decay) if args.capsule_carry else None
    losses = score_windows(model, ctx, mine, rt, observer=observer, progress=progress, carry=carry)
    model.train(was_training)
    lo, hi = (mine[0].first, mine[-1].end) if mine else (1, 1)
    return scored(ctx, lo, hi, losses)


def score_first_chunks(num_targets: int, chunk_tokens: int) -> list[tuple[int, int]]:
    """(lo, hi) of each chunk of targets that score-first evaluation scores, then learns from."""
    bounds = list(range(1, num_targets + 1, chunk_tokens)) + [num_targets + 1]
    return list(zip(bounds[:-1], bounds[1:]))


# --- feature: ttt (TTT_ENABLED) ---
def ttt_parameters(model: GPT, scope: str) -> dict[str, nn.Parameter]:
    """The parameters test-time training updates, by name: those whose role's TTT scope includes `scope`
    (a role with TTT scope "frozen", the EngramHash tables, is never among them; evaluate_streaming checks that
    nothing outside the scope moved)."""
    params = dict(model.named_parameters())
    in_scope = ("scalars",) if scope == "scalars" else ("scalars", "all")
    return {name: params[name] for name, role in parameter_roles(model).items() if ROLES[role].ttt_scope in in_scope}


def ttt_sequence_starts(lo: int, hi: int, seq_len: int) -> list[int]:
    """Starts of the sequences TTT trains on after scoring targets lo..hi-1: every target they hold lies at or
    before hi-1."""
    starts = list(range(max(0, lo - 1), hi - 1 - seq_len + 1, seq_len))
    if hi - 1 - seq_len >= 0 and (not starts or starts[-1] != hi - 1 - seq_len):
        starts.append(hi - 1 - seq_len)  # the chunk's tail, overlapping the previous sequence
    return starts


def ttt_train_on_chunk(model: GPT, ctx: StreamContext, lo: int, hi: int, optimizer: torch.optim.Optimizer,
                       params: list[nn.Parameter], args: Hyperparameters, rt: Runtime, events: list | None) -> None:
    """Learn from the already-scored targets lo..hi-1: sequences whose every target lies at or before hi-1."""
    starts = ttt_sequence_starts(lo, hi, ctx.seq_len)
    if not starts:
        return
    if events is not None:
        events.append(("train", lo, hi, min(starts) + 1, max(starts) + ctx.seq_len))
    model.train()
    for _ in range(args.ttt_epochs):
        for i in range(0, len(starts), ctx.batch_windows):
            batch = starts[i:i + ctx.batch_windows]
            x = torch.stack([ctx.val[s:s + ctx.seq_len] for s in batch])
            y = torch.stack([ctx.val[s + 1:s + ctx.seq_len + 1] for s in batch])
            with rt.autocast():
                loss = token_losses(model(x), y).mean()
            loss.backward()
            if args.ttt_grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, args.ttt_grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    model.eval()
# --- end feature: ttt ---


def chunk_scoring_context(ctx: StreamContext, args: Hyperparameters) -> StreamContext:
    """The scoring context of score-first chunks: a batch of at most one chunk's windows (a chunk scores
    EVAL_CHUNK_TOKENS targets, `stride` new ones a window). Scoring never batches across a chunk boundary, so a
    wider batch would be padding: with the compiled forward's one shape, a chunk of 4,096 targets in a batch of
    256 windows of stride 64 computed four times the windows it scored."""
    stride = args.sliding_eval_stride or ctx.seq_len
    return ctx._replace(batch_windows=min(ctx.batch_windows, -(-args.eval_chunk_tokens // stride)))


def evaluate_streaming(model: GPT, ctx: StreamContext, args: Hyperparameters, rt: Runtime, observer=None,
                       events: list | None = None, progress: Progress | None = None) -> ScoredTargets:
    """Score-first evaluation in chunks of EVAL_CHUNK_TOKENS targets: score a chunk with the current state,
    then let the chunk update the state (a TTT step), then move on; the EvalEngram memory counts each target as
    soon as it is scored. Each rank owns a contiguous run of chunks and starts from the artifact's weights and
    empty counts; no gradient crosses ranks, since it would carry other ranks' unscored future."""
    stride = args.sliding_eval_stride or ctx.seq_len
    chunks = score_first_chunks(ctx.num_targets, args.eval_chunk_tokens)
    mine = chunks[len(chunks) * rt.rank // rt.world_size:len(chunks) * (rt.rank + 1) // rt.world_size]
    if progress is not None:
        progress.total = sum(hi - lo for lo, hi in mine)
    if args.ttt_enabled:
        model = copy.deepcopy(model)
        chosen = ttt_parameters(model, args.ttt_scope)
        params = list(chosen.values())
        for name, p in model.named_parameters():
            p.requires_grad_(name in chosen)
        optimizer = torch.optim.SGD(params, lr=args.ttt_lr, momentum=args.ttt_momentum)
        frozen = {n: p.detach().clone() for n, p in model.named_parameters() if n not in chosen}
        roles = parameter_roles(model)
    memory = EvalEngram(args, model.tok_emb.num_embeddings, rt.device) if args.eval_engram else None
    carry = CapsuleCarry(ctx, args.capsule_carry_decay) if args.capsule_carry else None
    chunk_ctx = chunk_scoring_context(ctx, args)
    model.eval()
    losses = []
    for lo, hi in mine:
        if events is not None:
            events.append(("score", lo, hi))
        losses.append(score_windows(model, chunk_ctx, plan_windows(lo, hi, ctx.num_targets, ctx.seq_len, stride), rt,
                                    memory, observer, progress, carry))
        if args.ttt_enabled and (lo, hi) != mine[-1]:  # this rank's later chunks are the only ones an update can help
            ttt_train_on_chunk(model, ctx, lo, hi, optimizer, params, args, rt, events)
    if args.ttt_enabled:  # nothing outside the TTT scope moved (the EngramHash tables' scope is "frozen")
        for name, p in model.named_parameters():
            if name in frozen and not torch.equal(p, frozen[name]):
                raise RuntimeError(f"TTT moved {name} (role {roles[name]}), which is outside TTT_SCOPE={args.ttt_scope}")
    lo, hi = (mine[0][0], mine[-1][1]) if mine else (1, 1)
    return scored(ctx, lo, hi, torch.cat(losses) if losses else torch.zeros(0, device=rt.device))


def reduce_scored(part: ScoredTargets, rt: Runtime) -> EvalTotals:
    packed = torch.stack((part.losses.double().sum(), torch.tensor(float(part.targets.numel()), device=rt.device,
                          dtype=torch.float64), part.nbytes.double().sum()))
    packed = rt.all_reduce(packed)
    return EvalTotals(float(packed[0]), int(packed[1]), int(packed[2]))


def dump_token_losses(path: str, part: ScoredTargets, rt: Runtime) -> None:
    """Write every target's loss (nats) and bytes, in validation order, to an .npz (rank 0 gathers)."""
    local = (part.targets.cpu().numpy(), part.losses.float().cpu().numpy(), part.nbytes.cpu().numpy())
    gathered = [None] * rt.world_size if rt.distributed else [local]
    if rt.distributed:
        dist.all_gather_object(gathered, local)
    if rt.is_main:
        targets, losses, nbytes = (np.concatenate(parts) for parts in zip(*gathered))
        order = np.argsort(targets, kind="stable")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, targets=targets[order], loss_nats=losses[order], bytes=nbytes[order].astype(np.int32))
    rt.barrier()


def warm_up_scoring(model: GPT, ctx: StreamContext, rt: Runtime) -> int:
    """Score synthetic tokens (never validation tokens) at the batch shape scoring uses, so that a compiled scoring
    forward compiles here, outside the timed pass; returns the number of windows scored."""
    windows = ctx.batch_windows if ctx.forward.compiled else min(ctx.batch_windows, 2)
    targets = windows * ctx.seq_len
    stream = torch.randint(0, model.tok_emb.num_embeddings, (targets + 1,),
                           generator=torch.Generator().manual_seed(0)).to(rt.device)
    was_training = model.training
    model.eval()
    score_windows(model, ctx._replace(val=stream, last_bos=torch.full_like(stream, -1)),
                  plan_windows(1, targets + 1, targets, ctx.seq_len, ctx.seq_len), rt)
    model.train(was_training)
    return windows


def warm_up_eval(model: GPT, ctx: StreamContext, args: Hyperparameters, rt: Runtime) -> None:
    """Run the eval graphs once on synthetic tokens: the scoring forward, and for TTT a backward whose gradients
    are dropped. No optimizer steps, so the weights are unchanged."""
    windows = warm_up_scoring(model, ctx, rt)
    chunk_ctx = chunk_scoring_context(ctx, args)
    if (ctx.forward.compiled and chunk_ctx.batch_windows != ctx.batch_windows
            and any(options["kind"] == "streaming" for _, options in eval_modes(args))):
        warm_up_scoring(model, chunk_ctx, rt)  # the chunks' narrower batch shape compiles here too
    if args.ttt_enabled:
        batch = torch.randint(0, model.tok_emb.num_embeddings, (min(windows, 2), ctx.seq_len),
                              generator=torch.Generator().manual_seed(0)).to(rt.device)
        with rt.autocast():
            token_losses(model(batch), batch).mean().backward()
        model.zero_grad(set_to_none=True)


def eval_modes(args: Hyperparameters) -> list[tuple[str, dict]]:
    """(log key, options) of each evaluation the flags ask for, after the plain round trip."""
    modes = []
    if args.sliding_eval_stride:
        modes.append(("final_sliding_window", dict(kind="windows", stride=args.sliding_eval_stride)))
    if args.eval_engram or args.ttt_enabled:  # one score-first pass with every streaming feature that is on
        name = "_".join(part for part, on in (("ttt", args.ttt_enabled), ("eval_engram", args.eval_engram)) if on)
        modes.append((f"final_{name}", dict(kind="streaming", ttt=args.ttt_enabled, engram=args.eval_engram)))
    return modes


def run_eval_mode(model: GPT, ctx: StreamContext, options: dict, args: Hyperparameters, rt: Runtime,
                  observer=None, events: list | None = None, progress: Progress | None = None) -> ScoredTargets:
    if options["kind"] == "windows":
        return evaluate_windows(model, ctx, options["stride"], rt, observer, progress)
    return evaluate_streaming(model, ctx, args, rt, observer, events, progress)


# -----------------------------------------------------------------------------
# Main
# -----------------------------------------------------------------------------
def count_parameters(model: GPT) -> dict[str, int]:
    ternary = {id(m.weight) for m in model.modules() if isinstance(m, TernaryLinear)}
    counts = {"ternary": 0, "fp_matrix": 0, "embedding": 0, "scalar": 0}
    params = dict(model.named_parameters())
    for name, role in parameter_roles(model).items():
        kind = ROLES[role].count_kind
        if kind == "matrix":
            kind = "ternary" if id(params[name]) in ternary else "fp_matrix"
        counts[kind] = counts.get(kind, 0) + params[name].numel()
    counts["total"] = sum(counts.values())
    return counts


def environment_lines(rt: Runtime) -> list[str]:
    lines = [f"python:{platform.python_version()} torch:{torch.__version__} numpy:{np.__version__}",
             f"platform:{platform.platform()} cpu_count:{os.cpu_count()} world_size:{rt.world_size} device:{rt.device}"]
    if rt.device.type == "cuda":
        lines.append(f"gpu:{torch.cuda.get_device_name(rt.device)} cuda:{torch.version.cuda}")
    return lines


def resolve_run_id(args: Hyperparameters, rt: Runtime) -> str:
    """RUN_ID, or one generated on rank 0 and shared, so every rank names the same files."""
    run_id = [args.run_id or time.strftime("%Y%m%d_%H%M%S_") + uuid.uuid4().hex[:6]]
    if rt.distributed:
        dist.broadcast_object_list(run_id, src=0)
    return run_id[0]


ARTIFACT_FAILURES = ("over_cap", "failed")


def artifact_path(args: Hyperparameters, failure: str = "") -> Path:
    """ARTIFACT_DIR (or LOG_DIR)/<RUN_ID>_model.skc; an over-cap or failed run's artifact says so in its name."""
    return Path(args.artifact_dir or args.log_dir) / f"{args.run_id}_model{'.' + failure if failure else ''}.skc"


def write_artifact(path: Path, blob: bytes) -> None:
    try:
        atomic_write_bytes(path, blob)
    except OSError as error:
        raise ArtifactError(f"cannot write the artifact {path} ({error.strerror}); nothing was left under that "
                            "name: free space in ARTIFACT_DIR or point it elsewhere") from None


def export_and_reload(model: GPT, args: Hyperparameters, rt: Runtime, log: Logger, status: RunStatus) -> Path:
    """Rank 0 writes the artifact and reports its bytes; every rank learns together whether that worked. In
    SUBMISSION_MODE an artifact over the cap is kept as <RUN_ID>_model.over_cap.skc and fails the run."""
    def export_on_rank_0() -> None:
        if not rt.is_main:
            return
        t0 = time.perf_counter()
        result = export_model(model, args, log)
        try:
            account_artifact(result, Path(__file__).stat().st_size, args, log)
        except ArtifactError:
            write_artifact(artifact_path(args, "over_cap"), result.blob)
            log(f"artifact_path:{artifact_path(args, 'over_cap')} (over the cap: not a submission)")
            raise
        write_artifact(artifact_path(args), result.blob)
        status.artifact = artifact_path(args)
        log(f"artifact_path:{artifact_path(args)} packing:{result.packing} codec:{result.codec} "
            f"export_time:{1000.0 * (time.perf_counter() - t0):.0f}ms")
        for line in component_report(result):
            log(line)
    together(rt, export_on_rank_0)
    return artifact_path(args)


def read_artifact(path: str | Path) -> tuple[dict, list[TensorRecord]]:
    try:
        blob = Path(path).read_bytes()
    except OSError as error:
        raise ArtifactError(f"cannot read the artifact {path} ({error.strerror})") from None
    return deserialize_records(unframe_artifact(blob, str(path)))


def log_eval(log: Logger, key: str, score, rt: Runtime, args: Hyperparameters, overhead_ms: float = 0.0) -> EvalTotals:
    """Run one evaluation and print the official pair of lines. eval_time includes overhead_ms (reading and
    decoding the artifact, warm-up); a mode over EVAL_MAX_SECONDS is flagged, and fails a submission run.
    score(progress) runs the evaluation; progress prints its ETA while it runs."""
    t0 = time.perf_counter()
    part = score(Progress(log, key))
    totals = reduce_scored(part, rt)
    elapsed_ms = rt.all_reduce(torch.tensor(overhead_ms + 1000.0 * (time.perf_counter() - t0), device=rt.device,
                                            dtype=torch.float64), op=dist.ReduceOp.MAX).item()
    log(f"{key} val_loss:{totals.val_loss:.4f} val_bpb:{totals.val_bpb:.4f} eval_time:{elapsed_ms:.0f}ms")
    log(f"{key}_exact val_loss:{totals.val_loss:.8f} val_bpb:{totals.val_bpb:.8f}")
    if args.eval_dump_token_losses:
        dump = Path(args.eval_dump_token_losses)
        dump_token_losses(str(dump.with_name(f"{dump.stem}_{key}.npz")), part, rt)
    if elapsed_ms > 1000.0 * args.eval_max_seconds:
        message = f"{key} took {elapsed_ms / 1000.0:.1f}s, over EVAL_MAX_SECONDS={args.eval_max_seconds}"
        log("WARNING: EVAL OVER BUDGET: " + message)
        if args.submission_mode:
            raise RuntimeError(message)
    return totals


# Bad input: the run stops with one `error:` line and exit status 2.
START_UP_ERRORS = (ConfigError, ShardError, ArtifactError, FileNotFoundError)


def check_writable_dir(label: str, folder: str) -> None:
    """A folder the run will write into must be one, or be creatable; checked without creating anything."""
    existing = Path(folder or ".")
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{label}={folder} cannot be a folder: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{label}={folder} is not writable ({existing} is read-only to this user): point it at a "
                          "folder you can write")


FINISHED_RUN = re.compile(r"^(stop_reason:completed|final_\w+_roundtrip_exact )", re.M)


def run_log_path(args: Hyperparameters) -> Path:
    return Path(args.log_dir) / f"{args.run_id}.txt"


def check_outputs(args: Hyperparameters) -> None:
    """Every output location is writable, and RUN_ID does not name a finished run (its log and artifact would be
    replaced) unless RUN_OVERWRITE=1; no side effects, so DRY_RUN=1 runs it too."""
    check_writable_dir("LOG_DIR", args.log_dir)
    if not args.eval_artifact:
        check_writable_dir("ARTIFACT_DIR", args.artifact_dir or args.log_dir)
    if args.eval_dump_token_losses:
        check_writable_dir("EVAL_DUMP_TOKEN_LOSSES", str(Path(args.eval_dump_token_losses).parent))
    log_path = run_log_path(args)
    if (args.run_id and not args.run_overwrite and log_path.is_file()
            and FINISHED_RUN.search(log_path.read_text(encoding="utf-8", errors="replace"))):
        raise ConfigError(f"RUN_ID={args.run_id} names a finished run ({log_path}); pick another RUN_ID, or set "
                          "RUN_OVERWRITE=1 to replace its log and artifact")


def open_run_log(args: Hyperparameters, rt: Runtime) -> Logger:
    """Rank 0 checks the outputs, removes the artifacts an overwritten run of this RUN_ID left, and starts the log.
    An evaluation (EVAL_ARTIFACT) writes no artifact and may be reading this RUN_ID's: it removes none."""
    if not rt.is_main:
        return Logger(None)
    check_outputs(args)
    folder = artifact_path(args).parent
    try:
        if not args.eval_artifact:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=folder):
                pass
            for failure in ("",) + ARTIFACT_FAILURES:
                artifact_path(args, failure).unlink(missing_ok=True)
    except OSError as error:
        raise ConfigError(f"ARTIFACT_DIR={folder} is not writable ({error.strerror}): point it at a folder you "
                          "can write") from None
    return Logger(run_log_path(args), append=bool(args.resume_from))  # a resumed run continues its log


class Inputs(NamedTuple):
    """What the start-up checks read: the tokenizer, each split's shards, and the artifact to evaluate."""
    sp: object
    vocab_size: int
    shards: dict[str, tuple[list[str], list[int]]]  # split -> (files, token counts)
    artifact: tuple[dict, list[TensorRecord]] | None
    artifact_args: Hyperparameters | None  # args with the artifact's model settings
    artifact_read_ms: float


def check_inputs(args: Hyperparameters, world_size: int) -> Inputs:
    """Everything the run reads, checked on this rank before step 1: the tokenizer (loads; matches VOCAB_SIZE, the
    data's manifest and the named variant), every shard's header and size, the batch split, and the artifact of
    EVAL_ARTIFACT (intact, its config in range, its vocabulary the tokenizer's)."""
    sp = load_tokenizer(args.tokenizer_path)
    vocab_size = int(sp.vocab_size())
    if args.vocab_size and args.vocab_size != vocab_size:
        raise ConfigError(f"VOCAB_SIZE={args.vocab_size} but tokenizer {args.tokenizer_path} has {vocab_size} pieces")
    check_tokenizer_spec(args, vocab_size)
    check_dataset_manifest(args, vocab_size)
    splits = ("val",) if args.eval_artifact else ("train", "val")
    shards = {split: shard_headers(args.data_path, split) for split in splits}
    if not args.eval_artifact:
        grad_accum_steps(args, world_size)
    artifact, artifact_args, read_ms = None, None, 0.0
    if args.eval_artifact:
        t0 = time.perf_counter()
        artifact = read_artifact(args.eval_artifact)
        artifact_args = artifact_model_args(artifact[0], args)
        check_record_shapes(artifact_args, artifact[1])
        read_ms = 1000.0 * (time.perf_counter() - t0)
        if artifact_args.vocab_size != vocab_size:
            raise ConfigError(f"EVAL_ARTIFACT={args.eval_artifact} was trained with a {artifact_args.vocab_size}-token "
                              f"vocabulary but TOKENIZER_PATH={args.tokenizer_path} has {vocab_size}: score it with the "
                              "tokenizer (and data) it was trained on")
    return Inputs(sp, vocab_size, shards, artifact, artifact_args, read_ms)


def check_all_shards(inputs: Inputs, rt: Runtime) -> str:
    """The token range of every shard (after check_inputs agreed on every rank); returns the line to log."""
    t0 = time.perf_counter()
    for files, counts in inputs.shards.values():
        check_token_ranges(files, counts, inputs.vocab_size, rt)
    parts = [f"{split}_shards:{len(files)} {split}_tokens:{sum(counts)}" for split, (files, counts) in inputs.shards.items()]
    return f"shard_check {' '.join(parts)} time:{1000.0 * (time.perf_counter() - t0):.0f}ms"


def dry_run(args: Hyperparameters, environ) -> None:
    """DRY_RUN=config checks the settings and the batch split on WORLD_SIZE processes; DRY_RUN=1 also checks every
    file and folder, as a real run does before step 1."""
    world_size = _parse_setting("WORLD_SIZE", environ.get("WORLD_SIZE", "1"), Setting(1, lo=1))
    if not args.eval_artifact:
        grad_accum_steps(args, world_size)
    shown, checked = args, ""
    if args.dry_run == "1":
        check_outputs(args)
        inputs = check_inputs(args, world_size)
        print(check_all_shards(inputs, Runtime(0, 1, 0, torch.device("cpu"), False)))
        shown, checked = inputs.artifact_args or args, "; every input and output checks out"
    print("\n".join(shown.lines()))
    print(f"dry_run: configuration is valid{checked}")


def stop_reason(error: BaseException, status: RunStatus) -> str:
    """The log's last line when a run does not complete: what stopped it, in which phase, after which step."""
    kind = {RunStopped: "sigterm", KeyboardInterrupt: "sigint", FloatingPointError: "non_finite_loss"}.get(
        type(error), "error")
    message = " | ".join(str(error).splitlines()) or "interrupted"
    return f"stop_reason:{kind} phase:{status.phase} step:{status.step} {type(error).__name__}: {message}"


def main(environ: dict[str, str] | None = None) -> None:
    args = Hyperparameters(environ)
    if args.dry_run != "0":
        dry_run(args, os.environ if environ is None else environ)
        return
    rt = init_runtime(args)
    args = args.replace({"RUN_ID": resolve_run_id(args, rt)})  # resolved values make a new configuration
    log = together(rt, lambda: open_run_log(args, rt))
    status = RunStatus()
    status.install()
    try:
        run(args, rt, log, status)
    except BaseException as error:
        if status.artifact is not None:
            os.replace(status.artifact, artifact_path(args, "failed"))
            log(f"artifact renamed to {artifact_path(args, 'failed')}: the run failed after writing it")
        log(stop_reason(error, status))
        raise
    finally:
        status.uninstall()
    log(f"stop_reason:completed steps:{status.step}")
    if rt.distributed:
        dist.destroy_process_group()


def run(args: Hyperparameters, rt: Runtime, log: Logger, status: RunStatus) -> None:
    """Check every input, then train, calibrate, export and evaluate (or evaluate EVAL_ARTIFACT)."""
    inputs = together(rt, lambda: check_inputs(args, rt.world_size))
    shard_line = check_all_shards(inputs, rt)
    for line in (inputs.artifact_args or args).lines() + environment_lines(rt):
        log(line)
    if inputs.artifact_args is not None:
        log(f"model settings: from the artifact {args.eval_artifact}, not from the environment")
    log(shard_line)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    if rt.device.type == "cpu":
        kept = keep_large_cpu_blocks()
        log(f"cpu_allocator:{'large blocks kept (mallopt)' if kept else 'the C library defaults (no glibc mallopt)'}")
        if not rt.distributed:
            log(f"cpu_threads:{torch.get_num_threads()}")
    args = args.replace({"VOCAB_SIZE": inputs.vocab_size})
    vocab_size = args.vocab_size
    tables = build_byte_tables(inputs.sp, vocab_size, rt.device)
    val_tokens = load_validation_tokens(args.data_path, args.train_seq_len, vocab_size, args.val_max_tokens,
                                        args.eval_len)
    log(f"val_tokens:{val_tokens.size - 1}")
    if args.val_max_tokens:
        log(f"WARNING: PARTIAL VALIDATION: VAL_MAX_TOKENS={args.val_max_tokens} scores {val_tokens.size - 1} tokens; "
            "val_bpb below is not the competition figure")
    backend, flash_fn = select_attention_backend(args.attn_backend, rt.device)
    log(f"attn_backend:{backend}")
    compiled = use_compile(args, rt)
    train_ctx = stream_context(val_tokens, tables, args.train_seq_len, args.val_batch_size, rt, compiled)
    eval_ctx = train_ctx if args.eval_len == args.train_seq_len else stream_context(
        val_tokens, tables, args.eval_len, args.val_batch_size, rt, compiled)
    if args.eval_artifact:
        log(f"eval_artifact:{args.eval_artifact} (no training)")
        (config, records), read_ms = inputs.artifact, inputs.artifact_read_ms
    else:
        model = GPT(args, vocab_size).to(rt.device)
        model.set_attention_backend(backend, flash_fn)
        log("params " + " ".join(f"{k}:{v}" for k, v in count_parameters(model).items()))
        if args.vrl_enabled and not vrl_active(args):
            log("vrl: off, layer 0 is not attention (VRL_ENABLED blends layer-0 attention values into later layers)")
        summary = train(args, rt, log, model, train_ctx, status)
        t0 = time.perf_counter()
        status.phase = "calibration"
        if args.calib_max_evals and args.weight_quant == "ternary":
            calibrate_ternary(model, args, rt, log)
        if args.eval_temperature_fit:
            fit_temperature(model, args, rt, log)
        if post_training_fits(args):
            fit_ms = 1000.0 * (time.perf_counter() - t0)
            log(f"post_training_time:{fit_ms:.0f}ms total_training_time:{summary['train_ms'] + fit_ms:.0f}ms "
                f"of MAX_WALLCLOCK_SECONDS={args.max_wallclock_seconds}")
        status.phase = "evaluation"
        if eval_ctx.forward.compiled:  # the trained weights are only scored: no TTT graph to warm up
            warm_up_scoring(model, eval_ctx, rt)
        log_eval(log, "final_prequant", lambda progress: evaluate_windows(model, eval_ctx, args.eval_len, rt,
                                                                          progress=progress), rt, args)
        status.phase = "export"
        path = export_and_reload(model, args, rt, log, status)
        t0 = time.perf_counter()
        config, records = read_artifact(path)
        read_ms = 1000.0 * (time.perf_counter() - t0)
    status.phase = "evaluation"
    t0 = time.perf_counter()
    loaded = model_from_records(config, records, args).to(rt.device)
    loaded.set_attention_backend(backend, flash_fn)
    warm_up_eval(loaded, eval_ctx, args, rt)
    load_ms = read_ms + 1000.0 * (time.perf_counter() - t0)
    log(f"artifact_load_and_warmup_time:{load_ms:.0f}ms")
    log_eval(log, f"final_{loaded.export_name}_roundtrip",
             lambda progress: evaluate_windows(loaded, eval_ctx, args.eval_len, rt, progress=progress), rt, args, load_ms)
    for key, options in eval_modes(args):
        log_eval(log, key, lambda progress: run_eval_mode(loaded, eval_ctx, options, args, rt, progress=progress), rt, args,
                 load_ms)


def exit_status(error: BaseException) -> int:
    """The command line's answer to an error: one `error:` line (exit 2) for bad input, a `stopped:` line for a
    signal, an `error:` line (exit 1) for a run that failed; a traceback only for what nobody foresaw."""
    if isinstance(error, START_UP_ERRORS):
        print(f"error: {error}", file=sys.stderr)
        return 2
    if isinstance(error, RunStopped):
        print(f"stopped: {error}", file=sys.stderr)
        return error.exit_status
    if isinstance(error, KeyboardInterrupt):
        print("stopped: SIGINT", file=sys.stderr)
        return 128 + signal.SIGINT
    if isinstance(error, (FloatingPointError, dist.DistError)):
        print(f"error: {error}", file=sys.stderr)
        return 1
    raise error


if __name__ == "__main__":
    try:
        main()
    except BaseException as error:  # noqa: B036 (SIGINT and SIGTERM get their own exit status)
        if isinstance(error, SystemExit):
            raise
        sys.exit(exit_status(error))
