"""EngramHash, TernaryMoE with router health, XSA, VRL, SmearGate, LN scale damping: their contracts
(causality and BOS locality are in test_eval_legality.py's registry)."""
import math
import re
import subprocess
import sys

import pytest
import torch

import train_gpt
import test_export as export_tests
from test_export import perturbed_model
from tiny_lm import REPO_ROOT_FOR_TESTS, subprocess_env

VOCAB = 96
EVERY_FLAG = dict(ENGRAM_ENABLED=1, ENGRAM_DIM=64, ENGRAM_BUCKETS=128, ENGRAM_LAYER=1, MOE_ENABLED=1, MOE_NUM_EXPERTS=3,
                  XSA_LAST_N=2, VRL_ENABLED=1, SMEAR_GATE=1, LN_SCALE_DAMPING=1)


def tiny_args(**overrides):
    """test_export's tiny configuration (vocabulary 96) with 4 layers, so the upper half is 2 layers."""
    return export_tests.tiny_args(**{"NUM_LAYERS": 4, **overrides})


def token_batch(seed=1, batch=2, length=24):
    x = torch.randint(4, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))
    x[:, [0, 9]] = train_gpt.BOS_ID
    return x


# --- settings -----------------------------------------------------------------------------------------------

def test_design_names_map_onto_ours_or_are_refused_with_a_pointer():
    args = train_gpt.Hyperparameters({"BIGRAM_HASH_ENABLED": "1", "BIGRAM_HASH_BUCKETS": "2048", "BIGRAM_HASH_DIM": "256",
                                      "ENGRAM_INJECT_LAYER": "2", "SMEARGATE_ENABLED": "1"})
    assert (args.engram_enabled, args.engram_buckets, args.engram_dim, args.engram_layer, args.smear_gate) == \
        (True, 2048, 256, 2, True)
    with pytest.raises(train_gpt.ConfigError, match="contradicts ENGRAM_BUCKETS"):
        train_gpt.Hyperparameters({"BIGRAM_HASH_BUCKETS": "2048", "ENGRAM_BUCKETS": "4096"})
    with pytest.raises(train_gpt.ConfigError, match="XSA_LAST_N"):
        train_gpt.Hyperparameters({"XSA_START_LAYER": "8"})
    with pytest.raises(train_gpt.ConfigError, match="VRL_START_LAYER.*VRL_ENABLED"):
        train_gpt.Hyperparameters({"VRL_START_LAYER": "3"})
    with pytest.raises(train_gpt.ConfigError, match="unknown setting BIGRAM_HASH_BUCKET "):
        train_gpt.Hyperparameters({"BIGRAM_HASH_BUCKET": "2048"})


@pytest.mark.parametrize("env, message", [
    ({"ENGRAM_ENABLED": "1", "ENGRAM_DIM": "102", "TERNARY_GROUP_SIZE": "2"}, "ENGRAM_DIM=102 must divide by ENGRAM_NUM_HEADS"),
    ({"ENGRAM_ENABLED": "1", "ENGRAM_LAYER": "6"}, "ENGRAM_LAYER=6 must be an encoder block"),
    ({"MOE_ENABLED": "1", "MOE_TOP_K": "5", "MOE_NUM_EXPERTS": "4"}, "MOE_TOP_K=5 must be at most"),
    ({"MOE_ENABLED": "1", "MOE_LAYER_FRAC": "0"}, "MOE_LAYER_FRAC must be above 0"),
    ({"XSA_LAST_N": "13"}, "XSA_LAST_N=13 must be at most NUM_LAYERS=12"),
])
def test_bad_extras_settings_fail_at_start(env, message):
    with pytest.raises(train_gpt.ConfigError, match=message):
        train_gpt.Hyperparameters(env)


def test_features_that_are_off_create_nothing_and_zero_cost_ones_add_no_parameter():
    base = {n for n, _ in train_gpt.GPT(tiny_args(), VOCAB).named_parameters()}
    free = {n for n, _ in train_gpt.GPT(tiny_args(XSA_LAST_N=4, LN_SCALE_DAMPING=1), VOCAB).named_parameters()}
    assert free == base
    everything = {n for n, _ in train_gpt.GPT(tiny_args(**EVERY_FLAG), VOCAB).named_parameters()}
    added = everything - base
    assert {n for n in added if n.startswith("engram.")} == {"engram.table", "engram.gate_scale", "engram.proj.weight",
                                                             "engram.key.weight"}
    assert "smear.gate" in added and "blocks.1.attn.vrl_gate" in added and "blocks.0.attn.vrl_gate" not in added
    assert "blocks.3.mlp.router.weight" in added and "blocks.1.mlp.router.weight" not in added  # the upper half only


# --- parameter roles ----------------------------------------------------------------------------------------

def test_every_gate_router_and_scale_is_a_scalar_in_the_no_decay_adam_group():
    args = tiny_args(**EVERY_FLAG)
    model = train_gpt.GPT(args, VOCAB)
    roles = train_gpt.parameter_roles(model)
    assert set(roles) == {n for n, _ in model.named_parameters()}
    controls = set()
    for prefix, module in model.named_modules():
        if isinstance(module, train_gpt.TernaryMoE):
            controls.add(f"{prefix}.router.weight")
        for local in ("gate", "gate_scale", "vrl_gate", "q_gain"):
            if getattr(module, local, None) is not None and f"{prefix}.{local}" in roles:
                controls.add(f"{prefix}.{local}")
    assert len(controls) == 1 + 1 + 3 + 4 + 2  # smear, engram scale, 3 VRL gates, 4 q gains, 2 routers
    assert all(roles[n] == "scalar" for n in controls)
    assert roles["engram.table"] == "hash_table"
    optimizers, groups = train_gpt.build_optimizers(model, args, fused=False)
    adam = optimizers[0]
    by_kind = {g["kind"]: g for g in adam.param_groups}
    assert by_kind["scalar"]["weight_decay"] == 0.0 and by_kind["hash_table"]["weight_decay"] == 0.0
    assert by_kind["hash_table"]["lr"] == args.engram_lr
    scalar_ids = {id(p) for p in by_kind["scalar"]["params"]}
    params = dict(model.named_parameters())
    assert all(id(params[n]) in scalar_ids for n in controls)
    names = [n for members in groups.values() for n in members]
    assert sorted(names) == sorted(params)
    for scope in ("scalars", "all"):
        assert "engram.table" not in train_gpt.ttt_parameters(model, scope)
    counts = train_gpt.count_parameters(model)
    assert counts["hash_table"] == params["engram.table"].numel()


# --- EngramHash ---------------------------------------------------------------------------------------------

def test_engram_fast_path_equals_the_general_path():
    args = tiny_args(ENGRAM_ENABLED=1, ENGRAM_DIM=64, ENGRAM_BUCKETS=97, ENGRAM_LAYER=0)
    engram = perturbed_model(args).engram
    assert engram.fast_path
    x = token_batch(length=40)
    assert torch.equal(engram.bucket_ids_2x2(x), engram.bucket_ids(x))
    hidden = torch.randn(2, 40, 64)
    with torch.no_grad():
        fast = engram(x, hidden)
        engram.fast_path = False
        general = engram(x, hidden)
    assert torch.equal(fast, general) and fast.abs().sum() > 0


def test_engram_hashes_with_distinct_primes_and_masks_keys_that_cross_a_bos():
    args = tiny_args(ENGRAM_ENABLED=1, ENGRAM_NUM_ORDERS=3, ENGRAM_NUM_HEADS=2, ENGRAM_DIM=96, ENGRAM_LAYER=0)
    engram = train_gpt.GPT(args, VOCAB).engram
    assert len(set(engram.primes.flatten().tolist())) == 6
    ids = torch.tensor([[5, 6, 7, train_gpt.BOS_ID, 8, 9, 10]])
    valid = engram.order_validity(ids)[0]
    # order 2 needs 1 earlier token of the same document, order 3 two, order 4 three
    assert valid[:, 0].tolist() == [False, True, True, False, True, True, True]
    assert valid[:, 1].tolist() == [False, False, True, False, False, True, True]
    assert valid[:, 2].tolist() == [False, False, False, False, False, False, True]
    memory = engram.memory(ids)[0].view(7, 6, -1)
    assert memory[3].abs().sum() == 0 and memory[6].abs().sum(-1).min() > 0


def test_engram_gate_scale_is_bounded():
    engram = train_gpt.GPT(tiny_args(ENGRAM_ENABLED=1, ENGRAM_DIM=64, ENGRAM_LAYER=0), VOCAB).engram
    scales = []
    for raw in (-50.0, 0.0, 50.0):
        engram.gate_scale.data.fill_(raw)
        scales.append(float((torch.nn.functional.softplus(engram.gate_scale.detach()) + 0.1).clamp(max=4.0)))
    assert scales[0] == pytest.approx(0.1, abs=1e-6) and scales[2] == 4.0
    engram.gate_scale.data.fill_(math.log(math.expm1(0.9)))
    x, hidden = token_batch(), torch.randn(2, 24, 64, requires_grad=True)
    engram(x, hidden).sum().backward()
    assert engram.gate_scale.grad is not None


# --- TernaryMoE ---------------------------------------------------------------------------------------------

def hand_routed_stats():
    """4 tokens over 2 experts: top-1 choices 0, 0, 0, 1."""
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.7, 0.3], [0.2, 0.8]])
    top = probs.topk(1, dim=-1).indices
    return train_gpt.router_stats_row(probs, top, torch.tensor(1.25)), probs


def test_router_health_on_a_hand_built_routing_equals_hand_computed_figures():
    row, probs = hand_routed_stats()
    layers, summary = train_gpt.router_health(torch.stack((row, row + row)))  # layer 1: the same routing twice
    entropy = -sum(p * math.log(p) for p in probs.flatten().tolist()) / 4
    for layer in layers:
        assert layer["top1_p"] == pytest.approx((0.9 + 0.6 + 0.7 + 0.8) / 4)
        assert layer["max_frac"] == pytest.approx(0.75)
        assert layer["entropy"] == pytest.approx(entropy, rel=1e-5)
        assert layer["aux"] == pytest.approx(1.25)
        assert layer["active"] == 2
    assert summary["max_frac_max"] == pytest.approx(0.75) and summary["active_min"] == 2
    assert summary["ln_experts"] == pytest.approx(math.log(2)) and summary["collapsed"] == 0


def test_collapse_flag_fires_on_a_forced_collapse_and_names_the_levers():
    probs = torch.tensor([[0.97, 0.01, 0.02]] * 10)
    row = train_gpt.router_stats_row(probs, probs.topk(1, dim=-1).indices, torch.tensor(2.9))
    lines = train_gpt.router_health_lines("router_health", row[None], step=7)
    assert re.search(r"max_frac_max:1\.0000 .*active_min:1 collapsed:1", lines[1])
    assert "MOE_ROUTER_AUX_LOSS_COEF" in lines[2] and "SCALAR_LR" in lines[2] and "MOE_ROUTER_TEMPERATURE" in lines[2]


def moe_layer(**overrides):
    args = tiny_args(MOE_ENABLED=1, MOE_NUM_EXPERTS=3, **overrides)
    torch.manual_seed(0)
    moe = train_gpt.TernaryMoE(args)
    for p in moe.parameters():
        p.data.add_(torch.randn_like(p) * 0.05)
    return moe


def test_top1_moe_passes_a_nonzero_gradient_to_the_router():
    moe = moe_layer()
    ctx = train_gpt.ForwardContext()
    out = moe(torch.randn(2, 8, 64), ctx)
    out.square().sum().backward()
    assert moe.router.weight.grad.abs().sum() > 0
    assert len(ctx.aux_losses) == 1 and ctx.aux_losses[0] > 0 and len(ctx.router_stats) == 1


def route_every_token_to(moe, expert):
    with torch.no_grad():
        moe.router.weight.fill_(-1.0)
        moe.router.weight[expert].fill_(1.0)


def test_an_expert_without_tokens_is_unchanged_by_a_step_despite_momentum_and_decay():
    moe = moe_layer()
    muon = train_gpt.Muon([p for e in moe.experts for p in e.parameters()], lr=0.05, momentum=0.95, backend_steps=5,
                          weight_decay=0.1)
    x = torch.rand(2, 8, 64) + 0.1  # positive inputs: a router row of ones wins for every token
    for step, expert in enumerate((1, 0)):
        route_every_token_to(moe, expert)
        moe.zero_grad(set_to_none=True)
        moe(x, train_gpt.ForwardContext()).square().sum().backward()
        if step == 1:
            idle = moe.experts[1]
            assert all(p.grad is not None and p.grad.norm() == 0 for p in idle.parameters())  # zero-filled, as DDP
            before = {n: p.detach().clone() for n, p in idle.named_parameters()}
        muon.step()
    assert all(torch.equal(p, before[n]) for n, p in moe.experts[1].named_parameters())
    assert all(torch.isfinite(p).all() for p in moe.parameters())
    assert moe.experts[0].fc.weight.grad.norm() > 0


def test_routing_starts_by_upcycling_expert_zero_and_the_state_survives_export():
    args = tiny_args(MOE_ENABLED=1, MOE_NUM_EXPERTS=3, MOE_START_FRACTION=0.5)
    model = perturbed_model(args)
    moe = model.blocks[3].mlp
    assert not moe.routing_on
    ctx = train_gpt.ForwardContext()
    h = torch.randn(2, 24, 64)
    assert torch.equal(moe(h, ctx), moe.experts[0](h)) and not ctx.router_stats
    reloaded = train_gpt.load_artifact(train_gpt.export_model(model, args, train_gpt.Logger(None)).blob, "t", args)
    assert not reloaded.blocks[3].mlp.routing_on
    train_gpt.start_moe_routing(model)
    assert moe.routing_on and torch.equal(moe.experts[2].fc.weight, moe.experts[0].fc.weight)
    reloaded = train_gpt.load_artifact(train_gpt.export_model(model, args, train_gpt.Logger(None)).blob, "t", args)
    assert reloaded.blocks[3].mlp.routing_on


def test_auxiliary_losses_enter_the_objective_only():
    args = tiny_args(MOE_ENABLED=1, MOE_NUM_EXPERTS=3)
    model = perturbed_model(args)
    x = token_batch()
    logits, aux = model(x, with_aux=True)
    assert torch.equal(logits, model(x)) and aux.loss > 0
    assert aux.router_stats.shape == (2, train_gpt.router_stats_width(3))


# --- attention extras ---------------------------------------------------------------------------------------

def test_xsa_output_is_orthogonal_to_the_own_value():
    y, v = torch.randn(2, 5, 4, 8), torch.randn(2, 5, 2, 8)
    out = train_gpt.exclude_self_value(y, v)
    own = v.repeat_interleave(2, dim=2)
    assert (out * own).sum(-1).abs().max() < 1e-5


def test_vrl_gate_starts_at_logit_four_and_ln_scale_damps_deeper_blocks():
    model = train_gpt.GPT(tiny_args(VRL_ENABLED=1, LN_SCALE_DAMPING=1), VOCAB)
    assert model.blocks[2].attn.vrl_gate.item() == 4.0 and model.blocks[0].attn.vrl_source
    assert [b.norm_scale for b in model.blocks] == pytest.approx([1.0, 1 / math.sqrt(2), 1 / math.sqrt(3), 0.5])


# --- export -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides", [{}, {"EXPORT_FP_FORMAT": "fp4"}, {"WEIGHT_QUANT": "none", "EXPORT_FORMAT": "int8_zlib"}])
def test_export_round_trip_is_exact_with_every_flag_on(overrides):
    args = tiny_args(**EVERY_FLAG, **overrides)
    model = perturbed_model(args)
    result = train_gpt.export_model(model, args, train_gpt.Logger(None))
    if args.export_format == "ternary":  # (int8_zlib keeps tensors this small in fp16, as the baseline does)
        assert any(r.name == "engram.table" and r.encoding == args.export_fp_format for r in result.records)
    in_memory = train_gpt.model_from_records(train_gpt.artifact_config(args, VOCAB), result.records, args)
    reloaded = train_gpt.load_artifact(result.blob, "test", args)
    x = token_batch()
    with torch.no_grad():
        assert torch.equal(in_memory(x), reloaded(x))
        assert (model(x) - reloaded(x)).abs().max() < 0.5
    assert train_gpt.export_model(model, args, train_gpt.Logger(None)).blob == result.blob


# --- training runs ------------------------------------------------------------------------------------------

FLAG_RUNS = {
    "engram": dict(ENGRAM_ENABLED=1, ENGRAM_DIM=64, ENGRAM_BUCKETS=256, ENGRAM_LAYER=0),
    "bigram_hash": dict(BIGRAM_HASH_ENABLED=1, ENGRAM_NUM_HEADS=1, ENGRAM_NUM_ORDERS=1, BIGRAM_HASH_DIM=64,
                        ENGRAM_LAYER=0, TTT_ENABLED=1, TTT_SCOPE="all", EVAL_CHUNK_TOKENS=2048),
    "moe": dict(MOE_ENABLED=1, MOE_NUM_EXPERTS=3, MOE_START_FRACTION=0.5, TRAIN_LOG_EVERY=2),
    "xsa": dict(XSA_LAST_N=1),
    "vrl": dict(VRL_ENABLED=1),
    "smear_gate": dict(SMEAR_GATE=1),
    "ln_scale_damping": dict(LN_SCALE_DAMPING=1),
}


@pytest.mark.parametrize("name", FLAG_RUNS)
def test_each_flag_trains_exports_and_round_trips(tiny_data, name):
    run_id = f"extra_{name}"
    train_gpt.main(tiny_data.env(RUN_ID=run_id, **FLAG_RUNS[name]))
    log = (tiny_data.root / "logs" / f"{run_id}.txt").read_text()
    losses = [float(v) for v in re.findall(r"train_loss:([\d.]+)", log)]
    assert all(math.isfinite(v) for v in losses) and "train_done steps:8" in log
    prequant = float(re.search(r"final_prequant_exact val_loss:([\d.]+)", log).group(1))
    roundtrip = float(re.search(r"final_ternary_\w+_roundtrip_exact val_loss:([\d.]+)", log).group(1))
    assert abs(prequant - roundtrip) < 0.05
    if name == "moe":  # routing starts at half the steps; router health follows at the log cadence
        assert "moe: routing starts at step 5 (voted at step 4)" in log
        assert re.search(r"^router_health step:6 top1_p_mean:[\d.]+ max_frac_mean:[\d.]+ max_frac_max:[\d.]+ "
                         r"entropy_mean:[\d.]+ ln_experts:1\.0986 aux_mean:[\d.]+ active_min:\d collapsed:[01]$", log, re.M)
        assert re.search(r"^router_health_layer step:6 layer:0 ", log, re.M)
        assert re.search(r"^router_health_final step:8 .*collapsed:[01]$", log, re.M)
        assert "router_health step:4 " not in log  # nothing routed before the start (from step 6)
    if name == "bigram_hash":
        assert "final_ttt " in log  # TTT ran with the table frozen (evaluate_streaming checks it)


def test_moe_trains_under_ddp_while_some_experts_are_unused(tiny_data):
    """Two gloo processes; before the MoE start the router and experts 1.. are outside the graph."""
    env = subprocess_env(tiny_data.env(RUN_ID="moe_ddp", ITERATIONS=4, WARMUP_STEPS=0, MOE_ENABLED=1, MOE_NUM_EXPERTS=3,
                                       MOE_START_FRACTION=0.5, TRAIN_LOG_EVERY=2))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train_gpt.py"]
    result = subprocess.run(cmd, cwd=REPO_ROOT_FOR_TESTS, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    log = (tiny_data.root / "logs" / "moe_ddp.txt").read_text()
    assert "moe: routing starts at step 3 (voted at step 2)" in log and "router_health_final step:4" in log
