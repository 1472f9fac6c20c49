"""Core trainer: configuration, data, the exact bpb, the model's quantized forward, optimizers, training."""
import math
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import train_gpt
from skcgolf.tinydata import document_stream
from tiny_lm import REPO_ROOT_FOR_TESTS, subprocess_env


def final_figures(log_text: str, key: str) -> dict[str, float]:
    line = next(line for line in log_text.splitlines() if line.startswith(key + " "))
    return {k: float(v) for k, v in re.findall(r"(\w+):([-\d.eE+]+)", line)}


# --- configuration -----------------------------------------------------------------------------------------------

def test_defaults_are_the_competition_configuration():
    args = train_gpt.Hyperparameters({})
    assert (args.num_layers, args.model_dim, args.weight_quant) == (12, 768, "ternary")
    assert args.max_wallclock_seconds == 599.0


@pytest.mark.parametrize("env, message", [
    ({"NUM_LAYERS": "twelve"}, "NUM_LAYERS"),
    ({"MATRIX_LR": "-1"}, "MATRIX_LR"),
    ({"MLP_ACT": "gelu"}, "MLP_ACT"),
    ({"TRAIN_SEQ_LEN": "1.5"}, "TRAIN_SEQ_LEN"),
    ({"NUM_LAYRS": "3"}, "did you mean NUM_LAYERS"),
    ({"MUON_MOMENTM": "0.9"}, "MUON_MOMENTUM"),
    ({"SCALR_LR": "0.1"}, "SCALAR_LR"),
    ({"MODEL_DIM": "100"}, "NUM_HEADS"),
    ({"MODEL_DIM": "192", "NUM_HEADS": "3", "NUM_KV_HEADS": "3"}, "TERNARY_GROUP_SIZE"),
])
def test_bad_settings_raise_naming_the_variable(env, message):
    with pytest.raises(train_gpt.ConfigError, match=message):
        train_gpt.Hyperparameters(env)


def test_bad_setting_stops_the_command_line_run():
    result = subprocess.run([sys.executable, "train_gpt.py"], cwd=REPO_ROOT_FOR_TESTS, capture_output=True, text=True,
                            env=subprocess_env({"DRY_RUN": "1", "NUM_LAYRS": "3"}))
    assert result.returncode == 2 and "NUM_LAYRS" in result.stderr


def test_dry_run_prints_the_resolved_configuration():
    result = subprocess.run([sys.executable, "train_gpt.py"], cwd=REPO_ROOT_FOR_TESTS, capture_output=True, text=True,
                            env=subprocess_env({"DRY_RUN": "config", "NUM_LAYERS": "9"}))
    assert result.returncode == 0, result.stderr
    assert "config NUM_LAYERS=9" in result.stdout and "config MODEL_DIM=768" in result.stdout


# --- data and the score ------------------------------------------------------------------------------------------

def test_token_ids_beyond_the_vocabulary_raise(tmp_path):
    train_gpt.write_shard(tmp_path / "fineweb_train_000000.bin", np.array([1, 5, 900, 7], dtype=np.uint16))
    stream = train_gpt.TokenStream(train_gpt.shard_files(str(tmp_path), "train"), vocab_size=512)
    with pytest.raises(train_gpt.ShardError, match="900"):
        stream.take(2)


def test_a_validation_stream_shorter_than_one_eval_window_is_refused(tmp_path):
    """Scoring reads one whole EVAL_SEQ_LEN window: a shorter stream (VAL_MAX_TOKENS, a tiny split) would index past
    its end, so it is refused with the settings to change."""
    train_gpt.write_shard(tmp_path / "fineweb_val_000000.bin", np.arange(1, 202, dtype=np.uint16))
    assert train_gpt.load_validation_tokens(str(tmp_path), 64, 512, eval_len=192).size == 193
    with pytest.raises(train_gpt.ShardError, match="VAL_MAX_TOKENS=100 leaves 64 .* window of 128.*EVAL_SEQ_LEN"):
        train_gpt.load_validation_tokens(str(tmp_path), 64, 512, max_tokens=100, eval_len=128)
    with pytest.raises(train_gpt.ShardError, match="has 192 whole-sequence targets"):
        train_gpt.load_validation_tokens(str(tmp_path), 64, 512, eval_len=256)


def test_byte_tables_count_the_decoded_utf8_bytes_of_each_document(tiny_data):
    tables = train_gpt.build_byte_tables(tiny_data.sp, tiny_data.sp.vocab_size(), torch.device("cpu"))
    for doc in tiny_data.val_docs[:40]:
        ids = torch.tensor([1] + tiny_data.sp.encode(doc))
        counted = int(tables.target_bytes(ids[:-1], ids[1:]).sum())
        assert counted == len(tiny_data.sp.decode(ids[1:].tolist()).encode("utf-8"))
    assert any(tiny_data.sp.is_byte(i) for i in tiny_data.sp.encode(" ".join(tiny_data.val_docs)))


def test_val_bpb_of_a_uniform_model_is_exact(tiny_data):
    """Zero embeddings give uniform predictions: loss ln(V) per target, bytes = the decoded text's UTF-8 length."""
    args = train_gpt.Hyperparameters(tiny_data.env())
    vocab = tiny_data.sp.vocab_size()
    model = train_gpt.GPT(args, vocab)
    torch.nn.init.zeros_(model.tok_emb.weight)
    stream = document_stream(tiny_data.sp, tiny_data.val_docs)
    rt = train_gpt.Runtime(0, 1, 0, torch.device("cpu"), False)
    tables = train_gpt.build_byte_tables(tiny_data.sp, vocab, rt.device)
    ctx = train_gpt.stream_context(stream, tables, 16, 64 * 16, rt)
    totals = train_gpt.reduce_scored(train_gpt.evaluate_windows(model, ctx, 16, rt), rt)
    expected_bytes = sum(len(tiny_data.sp.decode(tiny_data.sp.encode(d)).encode("utf-8")) for d in tiny_data.val_docs)
    assert totals.targets == stream.size - 1
    assert totals.bytes == expected_bytes
    assert totals.val_bpb == pytest.approx((stream.size - 1) * math.log(vocab) / math.log(2) / expected_bytes, rel=1e-6)


def test_compiled_scoring_gives_the_eager_score_with_one_graph_per_shape(tiny_data):
    """MODEL_COMPILE scores through torch.compile: the same per-target losses as eager, plain and sliding, and
    the padded last batch reuses the warmed-up graph (no compilation inside the timed pass)."""
    args = train_gpt.Hyperparameters(tiny_data.env(MODEL_DIM=32, TERNARY_GROUP_SIZE=16))
    vocab = tiny_data.sp.vocab_size()
    torch.manual_seed(0)
    model = train_gpt.GPT(args, vocab)
    stream = document_stream(tiny_data.sp, tiny_data.val_docs)[:16 * 7 + 1]  # 7 windows: batches of 3, 3 and 1
    rt = train_gpt.Runtime(0, 1, 0, torch.device("cpu"), False)
    tables = train_gpt.build_byte_tables(tiny_data.sp, vocab, rt.device)
    eager = train_gpt.stream_context(stream, tables, 16, 3 * 16, rt)
    compiled = train_gpt.stream_context(stream, tables, 16, 3 * 16, rt, compiled=True)
    torch._dynamo.reset()
    train_gpt.warm_up_eval(model, compiled, args, rt)
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for stride in (16, 4):
        want = train_gpt.evaluate_windows(model, eager, stride, rt)
        got = train_gpt.evaluate_windows(model, compiled, stride, rt)
        assert torch.equal(got.targets, want.targets)
        torch.testing.assert_close(got.losses, want.losses, rtol=1e-5, atol=1e-5)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames


# --- model and optimizers ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("rope_dims", [8, 4])
def test_rotary_gives_the_same_rotation_in_both_attention_layouts(rope_dims):
    """SDPA's [B, H, T, D] and the flash kernels' [B, T, H, D] get the same RoPE, partial RoPE included."""
    rotary = train_gpt.Rotary(rope_dims, 10000.0)
    x = torch.randn(2, 5, 3, 8)  # [B, T, H, D]
    heads_first = rotary(x.transpose(1, 2), heads_first=True).transpose(1, 2)
    assert torch.equal(heads_first, rotary(x, heads_first=False))
    assert torch.equal(heads_first[..., rope_dims:], x[..., rope_dims:])
    assert torch.equal(heads_first[:, 0], x[:, 0])  # position 0 is not rotated


def test_the_cpu_allocator_keeps_large_blocks():
    """glibc takes both mallopt settings here (Linux); elsewhere the function says it did not."""
    assert train_gpt.keep_large_cpu_blocks() == (sys.platform == "linux")


def test_ternary_forward_weights_take_three_values_per_group():
    layer = train_gpt.TernaryLinear(96, 8, group_size=32, scale_format="fp16")
    with torch.no_grad():
        w = layer(torch.eye(96)).T.reshape(8, 3, 32)  # the weights the forward actually used
    for row in w:
        for group in row:
            values = set(group.tolist())
            scale = max(abs(v) for v in values)
            assert values <= {-scale, 0.0, scale}


def test_ternary_straight_through_gradient_reaches_the_shadow_weight():
    layer = train_gpt.TernaryLinear(64, 4, group_size=32, scale_format="fp16")
    layer(torch.randn(5, 64)).sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0


def test_muon_orthogonalizes_and_returns_zero_for_zero():
    g = torch.randn(64, 32)
    singular = torch.linalg.svdvals(train_gpt.zeropower_via_newtonschulz5(g, steps=5))
    assert singular.min() > 0.5 and singular.max() < 1.3
    assert torch.count_nonzero(train_gpt.zeropower_via_newtonschulz5(torch.zeros(16, 8), steps=5)) == 0
    assert torch.isfinite(train_gpt.zeropower_via_newtonschulz5(torch.full((16, 8), 1e-30), steps=5)).all()


@pytest.mark.parametrize("overrides", [{}, {"TIE_EMBEDDINGS": "0"}, {"EMBED_DIM": "32"}, {"WEIGHT_QUANT": "none"}])
def test_every_parameter_is_in_one_group_and_moves_after_one_step(tiny_data, overrides):
    args = train_gpt.Hyperparameters(tiny_data.env(**overrides))
    torch.manual_seed(0)
    model = train_gpt.GPT(args, tiny_data.sp.vocab_size())
    for p in model.parameters():  # move zero-initialised projections so every parameter gets a gradient
        p.data.add_(torch.randn_like(p) * 0.02)
    optimizers, groups = train_gpt.build_optimizers(model, args, fused=False)
    names = [name for members in groups.values() for name in members]
    assert sorted(names) == sorted(name for name, _ in model.named_parameters())
    assert len(names) == len(set(names))
    for opt_name in ("tok_emb.weight", "blocks.0.attn_scale", "blocks.0.resid_mix", "skip_weights", "blocks.0.attn.q_gain"):
        assert opt_name not in groups["matrix"]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = torch.randint(0, tiny_data.sp.vocab_size(), (2, 32))
    train_gpt.training_loss(model(x), x.roll(-1, dims=1), 0.0)[0].backward()
    for opt in optimizers:
        opt.step()
    unchanged = [n for n, p in model.named_parameters() if torch.equal(p, before[n])]
    assert not unchanged


@pytest.mark.parametrize("overrides", [{}, {"TIE_EMBEDDINGS": "0"}, {"EMBED_DIM": "32"}, {"WEIGHT_QUANT": "none"}])
def test_each_parameter_role_decides_its_optimizer_group_export_and_ttt_scope(tiny_data, overrides):
    args = train_gpt.Hyperparameters(tiny_data.env(**overrides))
    model = train_gpt.GPT(args, tiny_data.sp.vocab_size())
    roles = train_gpt.parameter_roles(model)
    assert set(roles) == {name for name, _ in model.named_parameters()}
    _, groups = train_gpt.build_optimizers(model, args, fused=False)
    assert all(roles[name] == group for group, names in groups.items() for name in names)
    controls = {"blocks.0.attn_scale", "blocks.0.mlp_scale", "blocks.0.resid_mix", "skip_weights", "blocks.0.attn.q_gain"}
    assert {name for name, role in roles.items() if role == "scalar"} >= controls
    assert set(train_gpt.ttt_parameters(model, "scalars")) == {n for n, r in roles.items() if r == "scalar"}
    assert set(train_gpt.ttt_parameters(model, "all")) == set(roles)
    fp16_records = {r.name for r in train_gpt.encode_model(model, args) if r.encoding == "fp16"}
    assert controls <= fp16_records


def test_a_parameter_without_a_declared_role_is_refused(tiny_data):
    model = train_gpt.GPT(train_gpt.Hyperparameters(tiny_data.env()), tiny_data.sp.vocab_size())
    model.blocks[0].extra_gate = torch.nn.Parameter(torch.zeros(4))
    with pytest.raises(TypeError, match="blocks.0.extra_gate has no role: declare it in Block.param_roles"):
        train_gpt.parameter_roles(model)


def test_z_loss_enters_the_objective_but_not_the_reported_loss():
    logits, targets = torch.randn(2, 5, 11) * 3, torch.randint(0, 11, (2, 5))
    objective, ce = train_gpt.training_loss(logits, targets, 1e-2)
    assert objective > ce
    assert ce == pytest.approx(float(train_gpt.token_losses(logits, targets).mean()))


@pytest.mark.parametrize("kind", ["tanh", "poly"])
def test_softcap_is_bounded_and_monotone(kind):
    x = torch.linspace(-500, 500, 10001)
    y = train_gpt.softcap(x, 30.0, kind)
    assert y.abs().max() <= 30.0 and (y.diff() >= 0).all()


# --- the training loop -------------------------------------------------------------------------------------------

def test_training_lowers_the_loss_and_logs_the_official_lines(tiny_data):
    env = tiny_data.env(ITERATIONS=30, TRAIN_LOG_EVERY=5, RUN_ID="falls")
    train_gpt.main(env)
    log = (tiny_data.root / "logs" / "falls.txt").read_text()
    losses = [float(v) for v in re.findall(r"train_loss:([\d.]+)", log)]
    assert losses[-1] < losses[0] - 0.5
    assert log.splitlines()[0].startswith("config ")
    final = final_figures(log, "final_prequant")
    assert final["val_bpb"] > 0 and final["val_loss"] < math.log(tiny_data.sp.vocab_size())
    assert "train_done steps:30" in log


def test_deterministic_run_has_a_deterministic_kernel_for_every_op(tiny_data):
    """DETERMINISTIC=1 turns torch's deterministic kernels on, which raise for an op that has none: training,
    export and every evaluation of a model with EngramHash (embedding-bag style gathers and scatters) run."""
    env = tiny_data.env(ITERATIONS=4, RUN_ID="deterministic", DETERMINISTIC=1, SLIDING_EVAL_STRIDE=8, ENGRAM_ENABLED=1,
                        ENGRAM_DIM=32, ENGRAM_BUCKETS=64, ENGRAM_LAYER=0)
    try:
        train_gpt.main(env)
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)
    log = (tiny_data.root / "logs" / "deterministic.txt").read_text()
    assert "final_sliding_window" in log


def test_wallclock_cap_stops_training(tiny_data):
    env = tiny_data.env(ITERATIONS=100000, MAX_WALLCLOCK_SECONDS=2, RUN_ID="capped", TRAIN_LOG_EVERY=1000)
    train_gpt.main(env)
    log = (tiny_data.root / "logs" / "capped.txt").read_text()
    steps = int(re.search(r"train_done steps:(\d+)", log).group(1))
    assert 0 < steps < 100000 and "final_prequant" in log


def test_non_finite_loss_stops_the_run_with_the_step(tiny_data, monkeypatch):
    real = train_gpt.training_loss

    def poisoned(logits, targets, z):
        objective, ce = real(logits, targets, z)
        return objective, ce * float("nan")

    monkeypatch.setattr(train_gpt, "training_loss", poisoned)
    with pytest.raises(FloatingPointError, match="step 1"):
        train_gpt.main(tiny_data.env(RUN_ID="nan", WARMUP_STEPS=0))


def test_two_processes_match_one_process(tiny_data):
    """Same global batch on 1 and 2 gloo processes: the same sequences, the same averaged gradient."""
    figures = []
    for nproc in (1, 2):
        env = subprocess_env(tiny_data.env(ITERATIONS=4, RUN_ID=f"ddp{nproc}", WARMUP_STEPS=0))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "train_gpt.py"]
        result = subprocess.run(cmd, cwd=REPO_ROOT_FOR_TESTS, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        figures.append(final_figures((tiny_data.root / "logs" / f"ddp{nproc}.txt").read_text(), "final_prequant_exact"))
    assert figures[0]["val_loss"] == pytest.approx(figures[1]["val_loss"], abs=2e-3)


def test_a_dataset_variant_read_with_another_tokenizer_is_refused(tiny_data):
    args = train_gpt.Hyperparameters(tiny_data.env(DATA_PATH="data/datasets/fineweb10B_sp8192"))
    with pytest.raises(train_gpt.ConfigError, match="sp_bpe_8192"):
        train_gpt.check_tokenizer_spec(args, tiny_data.sp.vocab_size())
    train_gpt.check_tokenizer_spec(train_gpt.Hyperparameters(tiny_data.env()), tiny_data.sp.vocab_size())
