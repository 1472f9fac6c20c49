"""The MLX twin against train_gpt.py: same loss on converted weights, same optimizer step, same scored bytes,
artifacts that cross-load both ways to the same val_bpb, and every unsupported flag rejected by name.

Linux runs these on mlx[cpu] in float32 with toy shapes."""
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

mx = pytest.importorskip("mlx.core")
from mlx.utils import tree_flatten  # noqa: E402

import train_gpt  # noqa: E402
import train_gpt_mlx as twin  # noqa: E402
from skcgolf.tinydata import document_stream  # noqa: E402
from tiny_lm import REPO_ROOT_FOR_TESTS, subprocess_env  # noqa: E402

LOSS_TOL = 1e-4  # fp32 forward, PyTorch vs MLX
STEP_TOL = 2e-5  # max |parameter difference| after two optimizer steps (Adam and Muon), fp32
BPB_TOL = 1e-5  # the same artifact scored by both twins
TTT_BPB_TOL = 1e-4  # score-first TTT trains on the way, so the twins' rounding differences compound a little

FLAG_CONFIGS = [{}, {"TIE_EMBEDDINGS": "0"}, {"EMBED_DIM": "32"}, {"WEIGHT_QUANT": "none"},
                {"MLP_ACT": "leaky_relu2"}, {"SOFTCAP_TYPE": "poly"}, {"LOGIT_SOFTCAP": "0"}, {"ROPE_DIMS": "16"},
                {"QK_NORM": "0"}, {"NUM_KV_HEADS": "2"}, {"NUM_LAYERS": "3"}, {"TERNARY_SCALE_FORMAT": "fp8"},
                {"FP_STORAGE_SIM": "fp8"}, {"FP_STORAGE_SIM": "fp4"}, {"TURBO_QUANT_TRAIN": "1"},
                {"Z_LOSS_WEIGHT": "0.001"}, {"EVAL_TEMPERATURE_FIT": "1"}]


def config_id(overrides: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in overrides.items()) or "default"


def twin_args(tiny_data, **overrides) -> twin.Hyperparameters:
    return twin.Hyperparameters(tiny_data.env(VOCAB_SIZE=tiny_data.sp.vocab_size(), **overrides))


def perturbed_torch_model(args, seed: int = 0) -> train_gpt.GPT:
    """train_gpt.GPT with noise on every parameter (zero-initialised projections would hide the blocks)."""
    torch.manual_seed(seed)
    model = train_gpt.GPT(args, args.vocab_size)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        if model.logit_temperature is not None:
            model.logit_temperature.fill_(0.9)
    return model


def training_batch(tiny_data, seq_len: int = 32, rows: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.from_numpy(document_stream(tiny_data.sp, tiny_data.train_docs[:200]).astype(np.int64))
    span = tokens[:rows * seq_len + 1]
    return span[:-1].view(rows, seq_len), span[1:].view(rows, seq_len)


def to_mx(t: torch.Tensor) -> mx.array:
    return mx.array(t.numpy().astype(np.int32))


# --- forward and optimizer parity --------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides", FLAG_CONFIGS, ids=config_id)
def test_converted_weights_give_the_same_loss(tiny_data, overrides):
    args = twin_args(tiny_data, **overrides)
    torch_model = perturbed_torch_model(args)
    x, y = training_batch(tiny_data)
    with torch.no_grad():
        objective, ce = train_gpt.training_loss(torch_model(x), y, args.z_loss_weight)
    model = twin.to_mlx(torch_model)
    twin_objective, twin_ce = twin.training_loss(model(to_mx(x)), to_mx(y), args.z_loss_weight)
    assert abs(float(twin_ce) - float(ce)) < LOSS_TOL
    assert abs(float(twin_objective) - float(objective)) < LOSS_TOL


@pytest.mark.parametrize("overrides", [{"TIE_EMBEDDINGS": "0"}, {"EMBED_DIM": "32", "EVAL_TEMPERATURE_FIT": "1"}],
                         ids=config_id)
def test_conversion_round_trips_every_parameter_and_role(tiny_data, overrides):
    args = twin_args(tiny_data, **overrides)
    torch_model = perturbed_torch_model(args)
    model = twin.to_mlx(torch_model)
    assert twin.parameter_roles(model) == train_gpt.parameter_roles(torch_model)
    back = twin.to_torch(model).state_dict()
    for name, t in torch_model.state_dict().items():
        assert torch.equal(back[name], t), name


@pytest.mark.parametrize("overrides", [
    {},
    {"TIE_EMBEDDINGS": "0", "MUON_WEIGHT_DECAY": "0.1", "EMBED_WEIGHT_DECAY": "0.05", "GRAD_CLIP_NORM": "0.5",
     "MUON_ROW_NORM": "1", "MODEL_COMPILE": "1"},
    {"WEIGHT_QUANT": "none", "EMBED_DIM": "32", "Z_LOSS_WEIGHT": "0.001"},
], ids=config_id)
def test_optimizer_steps_give_the_same_parameters(tiny_data, overrides):
    """Two steps (Adam's bias correction and Muon's momentum buffer both matter on the second) from the same state."""
    args = twin_args(tiny_data, **overrides)
    torch_model = perturbed_torch_model(args)
    model = twin.to_mlx(torch_model)
    start = {name: p.detach().clone() for name, p in torch_model.named_parameters()}
    optimizers, groups = train_gpt.build_optimizers(torch_model, args, fused=False)
    twin_optimizers = twin.Optimizers(model, args, mx.float32)
    assert {role: sorted(names) for role, names in twin_optimizers.groups.items()} == {
        role: sorted(names) for role, names in groups.items()}
    grad_fn = twin.loss_and_grad_fn(model, args)
    x, y = training_batch(tiny_data)
    for step in (3, 4):  # inside the Muon momentum warm-up, at a reduced LR scale
        train_gpt.apply_schedules(optimizers, args, step, 0.5)
        objective, _ = train_gpt.training_loss(torch_model(x), y, args.z_loss_weight)
        objective.backward()
        if args.grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(torch_model.parameters(), args.grad_clip_norm)
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        twin_optimizers.apply_schedules(step, 0.5)
        _, grads = grad_fn(to_mx(x), to_mx(y))
        twin.optimizer_step(model, twin_optimizers, dict(tree_flatten(grads)), args)
        mx.eval(model.parameters(), twin_optimizers.state())
    ours = dict(tree_flatten(model.parameters()))
    moved = 0.0
    for name, p in torch_model.named_parameters():
        difference = np.abs(np.array(ours[name]) - p.detach().numpy()).max()
        assert difference < STEP_TOL, f"{name} differs by {difference}"
        moved = max(moved, float((p.detach() - start[name]).abs().max()))
    assert moved > 100 * STEP_TOL  # the steps did move the weights


# --- evaluation: same targets, same bytes, same losses -------------------------------------------------------------

VAL_DOCS = 40  # about 2,000 targets, byte-fallback pieces included


@pytest.fixture(scope="module")
def val_context(tiny_data):
    tables = train_gpt.build_byte_tables(tiny_data.sp, tiny_data.sp.vocab_size(), torch.device("cpu"))
    stream = document_stream(tiny_data.sp, tiny_data.val_docs[:VAL_DOCS])
    return train_gpt.stream_context(stream, tables, 32, 32 * 16, twin.SINGLE)


def test_both_twins_score_the_same_targets_and_bytes(tiny_data, val_context):
    args = twin_args(tiny_data)
    torch_model = perturbed_torch_model(args)
    theirs = train_gpt.evaluate_windows(torch_model, val_context, 8, twin.SINGLE)
    ours = twin.evaluate_windows(twin.to_mlx(torch_model), val_context, 8)
    assert torch.equal(ours.targets, theirs.targets) and torch.equal(ours.nbytes, theirs.nbytes)
    assert (ours.losses - theirs.losses).abs().max() < LOSS_TOL
    expected = sum(len(tiny_data.sp.decode(tiny_data.sp.encode(d)).encode("utf-8")) for d in tiny_data.val_docs[:VAL_DOCS])
    assert int(ours.nbytes.sum()) == expected


@pytest.mark.parametrize("scope", ["scalars", "all"])
def test_score_first_ttt_matches(tiny_data, val_context, scope):
    args = twin_args(tiny_data, TTT_ENABLED="1", TTT_SCOPE=scope, EVAL_CHUNK_TOKENS="512", TTT_LR="0.05")
    torch_model = perturbed_torch_model(args)
    model = twin.to_mlx(torch_model)
    before = dict(tree_flatten(model.parameters()))
    theirs = train_gpt.reduce_scored(train_gpt.evaluate_streaming(torch_model, val_context, args, twin.SINGLE),
                                     twin.SINGLE)
    ours = train_gpt.reduce_scored(twin.evaluate_streaming(model, val_context, args, ttt=True, engram=False),
                                   twin.SINGLE)
    plain = train_gpt.reduce_scored(twin.evaluate_windows(model, val_context, 32), twin.SINGLE)
    assert (ours.targets, ours.bytes) == (theirs.targets, theirs.bytes)
    assert abs(ours.val_bpb - theirs.val_bpb) < TTT_BPB_TOL
    assert abs(ours.val_bpb - plain.val_bpb) > 10 * abs(ours.val_bpb - theirs.val_bpb)  # TTT changed predictions
    after = dict(tree_flatten(model.parameters()))
    assert all(mx.array_equal(before[name], after[name]) for name in before)  # the artifact's model is untouched


@pytest.mark.parametrize("overrides, ttt", [({"EVAL_ENGRAM_ORDER": "2"}, False),
                                            ({"EVAL_ENGRAM_ORDER": "3", "EVAL_ENGRAM_BUCKETS": "512"}, True),
                                            ({"EVAL_ENGRAM_ORDER": "4", "EVAL_ENGRAM_BUCKETS": "512",
                                              "EVAL_ENGRAM_BACKOFF": "2"}, False)],
                         ids=["order2", "order3+ttt", "order4_backoff"])
def test_eval_engram_matches(tiny_data, val_context, overrides, ttt):
    args = twin_args(tiny_data, EVAL_ENGRAM="1", TTT_ENABLED=str(int(ttt)), EVAL_CHUNK_TOKENS="512", **overrides)
    torch_model = perturbed_torch_model(args)
    theirs = train_gpt.reduce_scored(train_gpt.evaluate_streaming(torch_model, val_context, args, twin.SINGLE),
                                     twin.SINGLE)
    ours = train_gpt.reduce_scored(twin.evaluate_streaming(twin.to_mlx(torch_model), val_context, args, ttt=ttt,
                                                           engram=True), twin.SINGLE)
    assert (ours.targets, ours.bytes) == (theirs.targets, theirs.bytes)
    assert abs(ours.val_bpb - theirs.val_bpb) < TTT_BPB_TOL


# --- whole runs: training, calibration, export, cross-loading ----------------------------------------------------------------

RUN_FLAGS = dict(ITERATIONS="3", VAL_MAX_TOKENS="2048", SLIDING_EVAL_STRIDE="16", TTT_ENABLED="1", EVAL_ENGRAM="1",
                 EVAL_CHUNK_TOKENS="512", TRAIN_LOG_EVERY="1", CALIB_MAX_EVALS="3", CALIB_MIN_PARAMS="0",
                 CALIB_TOKENS="1024", EMA_DECAY="0.5", EMA_START_FRAC="0.3", GRAD_CLIP_NORM="1.0", LR_WARMUP_STEPS="2",
                 WARMDOWN_ITERS="2")


def line_figures(path, key: str) -> dict[str, float]:
    """The name:number pairs of the first log line that starts with `key`."""
    line = next(line for line in path.read_text().splitlines() if line.startswith(key + " "))
    return {name: float(value) for name, value in re.findall(r"(\w+):(-?[\d.]+(?:e[-+]?\d+)?)", line)}


@pytest.fixture(scope="module")
def cross_runs(tiny_data, tmp_path_factory):
    """A run of each twin, then each twin evaluating the other's artifact."""
    logs = tmp_path_factory.mktemp("mlx_twin_logs")
    env = tiny_data.env(**RUN_FLAGS, LOG_DIR=str(logs))
    train_gpt.main({**env, "RUN_ID": "torch"})
    twin.main({**env, "RUN_ID": "mlx", "MODEL_COMPILE": "auto"})  # the twin's default: mx.compile
    twin.main({**env, "RUN_ID": "mlx_reads_torch", "EVAL_ARTIFACT": str(logs / "torch_model.skc")})
    train_gpt.main({**env, "RUN_ID": "torch_reads_mlx", "EVAL_ARTIFACT": str(logs / "mlx_model.skc")})
    return {name: logs / f"{name}.txt" for name in ("torch", "mlx", "mlx_reads_torch", "torch_reads_mlx")}


@pytest.mark.parametrize("writer, reader", [("torch", "mlx_reads_torch"), ("mlx", "torch_reads_mlx")])
def test_artifacts_cross_load_to_the_same_val_bpb(cross_runs, writer, reader):
    export = re.search(r"^(final_\w+_roundtrip) ", cross_runs[writer].read_text(), re.M).group(1)
    for key, tol in ((export, BPB_TOL), ("final_sliding_window", BPB_TOL), ("final_ttt_eval_engram", TTT_BPB_TOL)):
        written, read = (line_figures(cross_runs[run], key + "_exact")["val_bpb"] for run in (writer, reader))
        assert abs(written - read) < tol, (key, written, read)


def test_both_twins_train_alike(cross_runs):
    """Same SEED, same data, same schedule, EMA, clipping and calibration: the same training losses (4 decimals in
    the log) and, after three steps, nearly the same trained model."""
    for step in (1, 2, 3):
        losses = [line_figures(cross_runs[run], f"step:{step}/3")["train_loss"] for run in ("torch", "mlx")]
        assert abs(losses[0] - losses[1]) < 1e-3, (step, losses)
    bpb = [line_figures(cross_runs[run], "final_prequant_exact")["val_bpb"] for run in ("torch", "mlx")]
    assert abs(bpb[0] - bpb[1]) < 1e-3


def test_the_twin_log_has_the_official_lines(cross_runs):
    text = cross_runs["mlx"].read_text()
    for pattern in (r"^config NUM_LAYERS=2$", r"^compute_dtype:float32 \(auto: CPU", r"^WARNING: PARTIAL VALIDATION",
                    r"^params ternary:\d+", r"^param_group:matrix tensors:\d+", r"^step:3/3 train_loss:\S+ .* eta:\d+s$",
                    r"^train_done steps:3 ", r"^ema: applied decay 0.5 weights$", r"^final_prequant val_loss:", r"^artifact code_bytes:\d+ model_bytes:\d+",
                    r"^final_ternary_\w+_roundtrip val_loss:\S+ val_bpb:\S+ eval_time:\d+ms$",
                    r"^calibration evals:3 ", r"^final_sliding_window_exact ", r"^final_ttt_eval_engram_exact "):
        assert re.search(pattern, text, re.M), pattern


# --- configuration -------------------------------------------------------------------------------------------------

UNSUPPORTED_CASES = [("ATTN_BACKEND", "fa3"), ("ATTN_BACKEND", "fa2")]


@pytest.mark.parametrize("name, value", UNSUPPORTED_CASES)
def test_unsupported_flags_stop_the_run_naming_them(tiny_data, name, value):
    with pytest.raises(train_gpt.ConfigError, match=f"{name}.*train_gpt_mlx.py"):
        twin.main(tiny_data.env(**{name: value}))


def test_every_unsupported_flag_has_a_rejection_case():
    assert {name for name, _ in UNSUPPORTED_CASES} == set(twin.UNSUPPORTED_SETTINGS)
    assert not twin.SUPPORTED_SETTINGS & set(twin.UNSUPPORTED_SETTINGS)
    assert twin.SUPPORTED_SETTINGS <= set(twin.Hyperparameters.SETTINGS)


def test_a_setting_unknown_to_the_twin_runs_only_at_its_default(monkeypatch):
    """A flag added to train_gpt.py later (SKC, EngramHash, MoE, ...) stops the twin until it is ported."""
    monkeypatch.setitem(twin.Hyperparameters.SETTINGS, "SKC_FUTURE_FLAG", train_gpt.Setting(False))
    twin.check_twin_support(twin.Hyperparameters({}))
    with pytest.raises(train_gpt.ConfigError, match="SKC_FUTURE_FLAG=True is not implemented in train_gpt_mlx.py"):
        twin.check_twin_support(twin.Hyperparameters({"SKC_FUTURE_FLAG": "1"}))


def test_twin_settings_are_train_gpt_settings_plus_its_own():
    assert set(twin.Hyperparameters.SETTINGS) - set(train_gpt.Hyperparameters.SETTINGS) == {"MLX_COMPUTE_DTYPE"}
    with pytest.raises(train_gpt.ConfigError, match="MLX_COMPUTE_DTYPE"):
        twin.Hyperparameters({"MLX_COMPUTE_DTYP": "float32"})
    with pytest.raises(train_gpt.ConfigError, match="NUM_LAYERS"):
        twin.Hyperparameters({"NUM_LAYRS": "3"})


def test_compute_dtype_is_float32_on_a_cpu_and_overridable(tiny_data):
    assert twin.compute_dtype(twin.Hyperparameters({}))[0] == mx.float32
    args = twin_args(tiny_data, MLX_COMPUTE_DTYPE="bfloat16")
    dtype, why = twin.compute_dtype(args)
    assert dtype == mx.bfloat16 and why == "MLX_COMPUTE_DTYPE"
    torch_model = perturbed_torch_model(args)
    x, y = training_batch(tiny_data, rows=1)
    with torch.no_grad():
        _, ce = train_gpt.training_loss(torch_model(x), y, 0.0)
    _, bf16_ce = twin.training_loss(twin.to_mlx(torch_model, dtype)(to_mx(x)), to_mx(y), 0.0)
    assert abs(float(bf16_ce) - float(ce)) < 0.05


def test_the_cpu_blas_line_names_a_preloaded_blas_or_warns_about_the_reference_one():
    preload = {"LD_PRELOAD": "/opt/lib/libjemalloc.so.2:/usr/lib/openblas-pthread/libopenblas.so.0"}
    assert twin.cpu_blas_line(False, "Linux", preload) == "cpu_blas:libopenblas.so.0 (LD_PRELOAD)"
    warning = twin.cpu_blas_line(False, "Linux", {"LD_PRELOAD": "/opt/lib/libjemalloc.so.2"})
    assert warning.startswith("WARNING: cpu_blas:reference") and twin.OPENBLAS_PRELOAD in warning
    assert twin.cpu_blas_line(True, "Linux", {}) is None and twin.cpu_blas_line(False, "Darwin", {}) is None


def test_the_twin_runs_on_one_device_only(tiny_data, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(train_gpt.ConfigError, match="one device"):
        twin.main(tiny_data.env())


def test_command_line_dry_run_and_bad_setting():
    ok = subprocess.run([sys.executable, "train_gpt_mlx.py"], cwd=REPO_ROOT_FOR_TESTS, capture_output=True, text=True,
                        env=subprocess_env({"DRY_RUN": "config", "NUM_LAYERS": "9"}))
    assert ok.returncode == 0, ok.stderr
    assert "config NUM_LAYERS=9" in ok.stdout and "config MLX_COMPUTE_DTYPE=auto" in ok.stdout
    bad = subprocess.run([sys.executable, "train_gpt_mlx.py"], cwd=REPO_ROOT_FOR_TESTS, capture_output=True, text=True,
                         env=subprocess_env({"DRY_RUN": "config", "ATTN_BACKEND": "fa3"}))
    assert bad.returncode == 2 and "ATTN_BACKEND" in bad.stderr
