"""The SKC model (issue 9): chunked scan, document locality of every SKC state, Koopman contraction, halting
rollback, shared blocks and recurrence, settings, aux losses, export, and a CPU run of ARCHITECTURE=skc.
Causality and BOS locality of every component in every eval mode live in the registry of test_eval_legality.py."""
import hashlib
import re

import pytest
import torch

import train_gpt

VOCAB = 64
CPU = train_gpt.Runtime(0, 1, 0, torch.device("cpu"), False)
CAPSULES = dict(CAPSULE_ENABLED=1, CAPSULE_NUM=4, CAPSULE_DIM=8)
FULL_SKC = dict(ARCHITECTURE="skc", SKC_CHUNK=4, **CAPSULES, KOOPMAN_ENABLED=1, FEEDBACK_PASSES=2,
                KOOPMAN_CONSISTENCY_WEIGHT=0.1, SKC_SPECTRAL_WEIGHT=0.1)


def make_args(**overrides):
    env = dict(NUM_LAYERS=4, MODEL_DIM=32, NUM_HEADS=2, NUM_KV_HEADS=1, MLP_MULT=2, TERNARY_GROUP_SIZE=16,
               TRAIN_SEQ_LEN=16, SKC_CHUNK=4, VOCAB_SIZE=VOCAB)
    env.update(overrides)
    return train_gpt.Hyperparameters({k: str(v) for k, v in env.items()})


def make_model(args, seed=0, noise=0.1):
    torch.manual_seed(seed)
    model = train_gpt.GPT(args, VOCAB)
    for p in model.parameters():
        p.data.add_(torch.randn_like(p) * noise)
    return model


def tokens_with_documents(batch=2, length=16, seed=3):
    x = torch.randint(4, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))
    x[:, 0] = train_gpt.BOS_ID
    x[0, 6] = x[1, 11] = x[1, 12] = train_gpt.BOS_ID
    return x


def naive_scan(u, log_decay, doc):
    state, out = torch.zeros(u.size(0), u.size(2)), []
    for t in range(u.size(1)):
        restart = (doc[:, t] == t).unsqueeze(-1)
        state = torch.where(restart, torch.zeros_like(state), log_decay.exp() * state) + u[:, t]
        out.append(state)
    return torch.stack(out, dim=1)


# --- the scan and the convolution ---------------------------------------------------------------------------

@pytest.mark.parametrize("length, chunk", [(16, 4), (16, 16), (13, 4), (7, 8), (31, 5), (9, 1)])
def test_chunked_scan_equals_the_step_by_step_recurrence(length, chunk):
    """Lengths that are and are not multiples of the chunk (the padded tail is stripped)."""
    gen = torch.Generator().manual_seed(length * 100 + chunk)
    u = torch.randn(3, length, 6, generator=gen)
    log_decay = -torch.rand(6, generator=gen) * 2.0 - 1e-3
    ids = torch.randint(4, VOCAB, (3, length), generator=gen)
    ids[0, length // 2] = ids[1, 0] = ids[2, 1] = ids[2, length - 1] = train_gpt.BOS_ID
    doc = train_gpt.document_starts(ids)
    fast = train_gpt.document_scan(u, log_decay, doc, chunk)
    assert fast.shape == u.shape
    assert torch.allclose(fast, naive_scan(u, log_decay, doc), rtol=1e-5, atol=1e-5)


def test_chunked_scan_is_finite_at_the_slowest_and_fastest_decays():
    u = torch.randn(1, 64, 2)
    doc = torch.zeros(1, 64, dtype=torch.int64)
    for log_decay in (torch.tensor([-1e-7, -60.0]), torch.tensor([0.0, -1e-3])):
        out = train_gpt.document_scan(u, log_decay, doc, 32)
        assert torch.isfinite(out).all()
        assert torch.allclose(out, naive_scan(u, log_decay, doc), rtol=1e-4, atol=1e-4)


def test_scan_output_after_a_bos_is_bit_identical_whatever_came_before():
    ids = tokens_with_documents(length=40)
    doc = train_gpt.document_starts(ids)
    u = torch.randn(2, 40, 6)
    changed = u.clone()
    changed[1, :11] = torch.randn(11, 6) * 1e3  # the document before the BOS at position 11
    for chunk in (4, 7, 40):
        y, y_changed = (train_gpt.document_scan(v, torch.full((6,), -0.05), doc, chunk) for v in (u, changed))
        assert torch.equal(y[1, 11:], y_changed[1, 11:]) and torch.equal(y[0], y_changed[0])


def test_causal_conv_never_reads_the_previous_document():
    ids = tokens_with_documents()
    doc = train_gpt.document_starts(ids)
    x = torch.randn(2, 16, 5)
    weight = torch.randn(5, 4)
    changed = x.clone()
    changed[0, :6] += 1.0  # everything before the BOS at position 6
    y, y_changed = (train_gpt.causal_depthwise_conv(v, weight, doc) for v in (x, changed))
    assert torch.equal(y[0, 6:], y_changed[0, 6:]) and not torch.equal(y[0, :6], y_changed[0, :6])
    assert torch.equal(y[1], y_changed[1])


# --- Koopman dynamics ---------------------------------------------------------------------------------------

def test_koopman_spectral_radius_stays_below_one_after_the_clamp():
    koopman = train_gpt.KoopmanDynamics(make_args(**CAPSULES, KOOPMAN_ENABLED=1, KOOPMAN_RANK=3))
    assert torch.equal(koopman.diag.detach(), torch.full((8,), 0.9))
    with torch.no_grad():
        koopman.diag.copy_(torch.linspace(-1.5, 1.5, 8))
        koopman.left.normal_(0, 2.0)
        koopman.right.normal_(0, 2.0)
    koopman.clamp_()
    assert koopman.diag.abs().max() < 0.999
    assert torch.linalg.eigvals(koopman.operator().detach().double()).abs().max() < 1.0
    assert torch.linalg.matrix_norm(koopman.operator().detach(), ord=2) < 1.0


class OneBatchLoader:
    def __init__(self, x):
        self.x = x

    def next_batch(self, tokens, seq_len):
        return self.x, self.x.roll(-1, 1)


def test_the_koopman_group_is_adam_without_decay_at_its_own_rate_and_every_step_clamps():
    args = make_args(**FULL_SKC, KOOPMAN_LR=0.123)
    model = make_model(args)
    optimizers, groups = train_gpt.build_optimizers(model, args, fused=False)
    assert set(groups["koopman"]) == {"koopman.diag", "koopman.left", "koopman.right"}
    adam = next(g for g in optimizers[0].param_groups if g["kind"] == "koopman")
    assert adam["lr"] == 0.123 and adam["weight_decay"] == 0.0
    assert train_gpt.ROLES["koopman"].ttt_scope == "frozen"  # test-time training has no clamp
    with torch.no_grad():
        model.koopman.diag.fill_(5.0)
    train_gpt.optimizer_step(model, model, OneBatchLoader(tokens_with_documents()), optimizers, args, CPU, 1, 32, 0, 1.0)
    assert model.koopman.diag.abs().max() < 0.999
    assert torch.linalg.eigvals(model.koopman.operator().detach().double()).abs().max() < 1.0


# --- feedback passes and halting ----------------------------------------------------------------------------

def decoded(model, x):
    ctx = train_gpt.ForwardContext()
    mid, decode = model.encode(x, ctx)
    return train_gpt.capsule_decode(model, mid, decode, ctx)


def test_halting_rolls_back_state_and_output_together():
    x = tokens_with_documents()
    base = dict(ARCHITECTURE="skc", SKC_CHUNK=4, **CAPSULES, KOOPMAN_ENABLED=1, FEEDBACK_PASSES=3)
    results = {}
    for name, extra in {"off": {}, "zero": {"ADAPTIVE_HALT_ENABLED": 1, "ADAPTIVE_HALT_THRESHOLD": 0},
                        "huge": {"ADAPTIVE_HALT_ENABLED": 1, "ADAPTIVE_HALT_THRESHOLD": 1e9},
                        "one_pass": {"FEEDBACK_PASSES": 1}}.items():
        model = make_model(make_args(**{**base, **extra}), noise=0.3).eval()
        with torch.no_grad():
            results[name] = decoded(model, x)
    for field in ("hidden", "state", "passes"):  # threshold 0 never halts; a huge one halts after the first pass
        assert torch.equal(getattr(results["zero"], field), getattr(results["off"], field))
        assert torch.equal(getattr(results["huge"], field), getattr(results["one_pass"], field))
    assert (results["off"].passes == 3).all() and (results["one_pass"].passes == 1).all()
    # a threshold between the two: some positions halt; each keeps the state and output of one and the same pass
    args = make_args(**base, ADAPTIVE_HALT_ENABLED=1, ADAPTIVE_HALT_THRESHOLD=0.0)
    model = make_model(args, noise=0.3).eval()
    with torch.no_grad():
        model.args = args.replace({"FEEDBACK_PASSES": 1})
        one = decoded(model, x)
        model.args = args.replace({"FEEDBACK_PASSES": 2})
        two = decoded(model, x)
        relative = ((two.state - one.state).flatten(2).norm(dim=-1) / one.state.flatten(2).norm(dim=-1)).flatten()
        model.args = args.replace({"FEEDBACK_PASSES": 3, "ADAPTIVE_HALT_THRESHOLD": float(relative.median())})
        mixed = decoded(model, x)
    halted = mixed.passes == 1
    assert halted.any() and (~halted).any()
    assert torch.equal(mixed.hidden[halted], one.hidden[halted]) and torch.equal(mixed.state[halted], one.state[halted])
    assert not torch.equal(mixed.hidden[~halted], one.hidden[~halted])
    with torch.no_grad():  # the model's own forward scores what the rollback kept
        assert torch.equal(model.hidden_states(x), train_gpt.rms_norm(mixed.hidden))


# --- everything off, shared blocks, recurrence --------------------------------------------------------------

def test_everything_off_is_the_plain_model():
    """Parameter count and initial weights equal those of the plain model before the SKC code existed (numbers
    from main at b34a3d4), and the forward equals the plain Block and U-Net loop spelled out, bit for bit."""
    args = make_args(NUM_LAYERS=3)
    torch.manual_seed(7)
    model = train_gpt.GPT(args, VOCAB)
    assert train_gpt.count_parameters(model) == MAIN_B34A3D4_COUNTS
    digest = hashlib.sha256(b"".join(n.encode() + t.numpy().tobytes() for n, t in model.state_dict().items()))
    assert digest.hexdigest() == MAIN_B34A3D4_DIGEST
    assert all(b.skc is None and b.shared == () and b.attn is not None for b in model.blocks)
    assert model.capsules is None and model.koopman is None and model.recurrence_band == ()
    for p in model.parameters():
        p.data.add_(torch.randn_like(p) * 0.1)
    x = tokens_with_documents()
    with torch.no_grad():
        h = h0 = train_gpt.rms_norm(torch.nn.functional.embedding(x, model.tok_emb.weight))
        skips, ctx = [], train_gpt.ForwardContext()
        for i, block in enumerate(model.blocks):  # the plain loop and Block.forward, spelled out
            if i >= model.num_encoder_layers and skips:
                h = h + model.skip_weights[i - model.num_encoder_layers] * skips.pop()
            h = block.resid_mix[0] * h + block.resid_mix[1] * h0
            h = h + block.attn_scale * block.attn(train_gpt.rms_norm(h), ctx)
            h = h + block.mlp_scale * block.mlp(train_gpt.rms_norm(h), ctx)
            if i < model.num_encoder_layers:
                skips.append(h)
        assert torch.equal(model.hidden_states(x), train_gpt.rms_norm(h))
    logits, aux = model(x, with_aux=True)
    assert float(aux.loss) == 0.0 and aux.router_stats is None


MAIN_B34A3D4_COUNTS = {"ternary": 21504, "fp_matrix": 0, "embedding": 2048, "scalar": 422, "total": 23974}
MAIN_B34A3D4_DIGEST = "8bb81986a51bf38e37675dcc5a1aad90fe5943cfbc943f46398415e47b83f7e3"


def test_shared_blocks_register_count_and_export_their_weights_once():
    args = make_args(SHARED_BLOCKS=2)
    model = make_model(args)
    assert model.blocks[2].shared[0] is model.blocks[0] and model.blocks[3].shared[0] is model.blocks[1]
    assert model.blocks[3].mlp is None and "blocks.3.attn_scale" in dict(model.named_parameters())
    assert not any(name.startswith(("blocks.2.attn.", "blocks.3.mlp.")) for name in model.state_dict())
    unshared = train_gpt.count_parameters(make_model(make_args()))
    assert train_gpt.count_parameters(model)["ternary"] == unshared["ternary"] // 2
    result = train_gpt.export_model(model, args, train_gpt.Logger(None))
    reloaded = train_gpt.load_artifact(result.blob, "test", args)
    in_memory = train_gpt.model_from_records(train_gpt.artifact_config(args, VOCAB), result.records, args)
    x = tokens_with_documents()
    with torch.no_grad():
        assert torch.equal(in_memory(x), reloaded(x))
    assert reloaded.blocks[2].shared[0] is reloaded.blocks[0]


def test_recurrence_reruns_the_band_only_when_active():
    args = make_args(RECURRENCE_DEPTH=2, RECURRENCE_LAYERS="1-2")
    model = make_model(args).eval()
    x = tokens_with_documents()
    calls = []
    for i, block in enumerate(model.blocks):
        block.register_forward_hook(lambda module, inputs, output, i=i: calls.append(i))
    with torch.no_grad():
        model(x)
        assert calls == [0, 1, 2, 1, 2, 1, 2, 3]
        calls.clear()
        train_gpt.set_training_phase(model, args, 0, recurrent=False)
        model(x)
    assert calls == [0, 1, 2, 3]
    assert train_gpt.recurrence_band(make_args(NUM_LAYERS=5, RECURRENCE_DEPTH=1)) == (1, 2)  # around the middle


def test_feedback_every_n_steps_switches_the_training_graph_only():
    args = make_args(**FULL_SKC, FEEDBACK_EVERY=2)
    model = make_model(args)
    x = tokens_with_documents()
    passes = []
    original = model.capsules.summarize
    model.capsules.summarize = lambda h, doc, *carry: passes.append(1) or original(h, doc, *carry)
    for step in (0, 1):
        train_gpt.set_training_phase(model, args, step, recurrent=True)
        passes.clear()
        model(x)
        assert len(passes) == (3 if step == 0 else 1)  # the first summary, then one per feedback pass
    model.eval()
    passes.clear()
    with torch.no_grad():
        model(x)
    assert len(passes) == 3  # evaluation always runs the feedback passes


def test_vrl_is_off_when_layer_0_is_an_skc_layer():
    assert not train_gpt.vrl_active(make_args(ARCHITECTURE="hybrid", SKC_CHUNK=4, VRL_ENABLED=1))
    assert train_gpt.vrl_active(make_args(ARCHITECTURE="hybrid", SKC_LAYERS="1,3", SKC_CHUNK=4, VRL_ENABLED=1))
    model = make_model(make_args(ARCHITECTURE="hybrid", SKC_CHUNK=4, VRL_ENABLED=1))
    assert not any("vrl_gate" in name for name, _ in model.named_parameters())


# --- aux losses, roles, export ------------------------------------------------------------------------------

def test_aux_losses_are_returned_in_training_and_absent_at_eval():
    args = make_args(**FULL_SKC)
    model = make_model(args)
    x = tokens_with_documents()
    logits, aux = model(x, with_aux=True)
    assert aux.loss.requires_grad and float(aux.loss.detach()) > 0
    assert not any(isinstance(v, torch.Tensor) and v.requires_grad for m in model.modules() for v in vars(m).values())
    model.eval()
    with torch.no_grad():
        assert float(model(x, with_aux=True)[1].loss) == 0.0


@pytest.mark.parametrize("overrides", [
    FULL_SKC, dict(ARCHITECTURE="hybrid", SKC_LAYERS="0,3", SKC_CHUNK=8, SKC_PARALLEL_RESIDUAL=1),
    dict(ARCHITECTURE="skc", SKC_CHUNK=16, SHARED_BLOCKS=2, RECURRENCE_DEPTH=1, **CAPSULES, FEEDBACK_PASSES=1,
         ADAPTIVE_HALT_ENABLED=1),
    dict(**CAPSULES), dict(**CAPSULES, CAPSULE_CARRY=1)])  # the capsule bank on the attention model
def test_every_skc_parameter_has_a_role_is_exported_and_round_trips(overrides):
    args = make_args(**overrides)
    model = make_model(args, noise=0.05)
    roles = train_gpt.parameter_roles(model)
    assert set(roles) == {name for name, _ in model.named_parameters()}
    counts = train_gpt.count_parameters(model)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    result = train_gpt.export_model(model, args, train_gpt.Logger(None))
    encodings = {r.name: r.encoding for r in result.records}
    for name, module in model.named_modules():
        if isinstance(module, train_gpt.TernaryLinear):
            assert encodings[name + ".weight"] == "ternary"
    for name, role in roles.items():
        if role in ("scalar", "koopman"):
            assert encodings[name] == "fp16"
    default_args = make_args()  # the loader takes the model's shape from the artifact, not from the environment
    reloaded = train_gpt.load_artifact(result.blob, "test", default_args)
    assert reloaded.args.architecture == args.architecture and reloaded.args.feedback_passes == args.feedback_passes
    in_memory = train_gpt.model_from_records(train_gpt.artifact_config(args, VOCAB), result.records, args)
    x = tokens_with_documents()
    with torch.no_grad():
        assert torch.equal(in_memory.eval()(x), reloaded.eval()(x))
        assert (model.eval()(x) - reloaded(x)).abs().max() < 0.1


@pytest.mark.parametrize("stride", [16, 5])
def test_capsule_carry_counts_the_document_before_the_window(stride):
    """Three documents over 48 targets, windows of 16, CAPSULE_CARRY_DECAY=0.9: each window's capsule sums start from
    the decayed contributions of its document's positions before it, each taken from the window that scored its
    target (the first window's context from the first window), up to the window's first BOS; its predictions equal a
    forward given that carry, and differ from one without it."""
    import numpy as np
    args = make_args(**CAPSULES, CAPSULE_CARRY=1, CAPSULE_CARRY_DECAY=0.9, VAL_BATCH_SIZE=64)
    model = make_model(args).eval()
    with torch.no_grad():
        model.capsules.gate.fill_(2.0)  # open the adapter (it starts nearly closed), so the capsules count
    seq_len, decay = 16, 0.9
    tokens = torch.randint(4, VOCAB, (49,), generator=torch.Generator().manual_seed(5))
    tokens[[0, 26, 38]] = train_gpt.BOS_ID
    ones = torch.ones(VOCAB, dtype=torch.int16)
    tables = train_gpt.ByteTables(ones, torch.zeros(VOCAB, dtype=torch.bool), torch.zeros(VOCAB, dtype=torch.bool))
    ctx = train_gpt.stream_context(tokens.numpy().astype(np.uint16), tables, seq_len, 64, CPU)
    rows = {}
    train_gpt.evaluate_windows(model, ctx, stride, CPU, observer=lambda t, logp: rows.update(zip(t.tolist(), logp)))
    windows = train_gpt.plan_windows(1, 49, 48, seq_len, stride)
    contribution = torch.zeros(48, args.capsule_num * (args.capsule_dim + 1))
    with torch.no_grad():
        for w in windows:
            mid, _ = model.encode(tokens[None, w.start:w.start + seq_len], train_gpt.ForwardContext())
            parts = model.capsules.contributions(mid)[0]
            new = slice(w.start if w is windows[0] else w.first - 1, w.end - 1)
            contribution[new] = parts[new.start - w.start:new.stop - w.start]
        carried_windows = 0
        for w in windows[1:]:
            inputs = tokens[w.start:w.start + seq_len]
            document = int(ctx.last_bos[w.start])  # the carry sums positions document .. start-1 (none at a BOS)
            weights = decay ** torch.arange(w.start - 1 - document, -1, -1, dtype=torch.float32)
            carried = (weights[:, None] * contribution[document:w.start]).sum(0)
            before_any_bos = torch.cumsum(inputs == train_gpt.BOS_ID, 0) == 0
            forward = train_gpt.ForwardContext()
            forward.capsule_carry = lambda parts: before_any_bos[None, :, None] * carried
            logp = torch.log_softmax(model.logits(model.hidden_states(inputs[None], forward)).float(), -1)[0]
            uncarried = torch.log_softmax(model.logits(model.hidden_states(inputs[None])).float(), -1)[0]
            for target in range(w.first, w.end):
                assert torch.allclose(rows[target], logp[target - w.start - 1], atol=1e-5), (w, target)
            if before_any_bos[w.first - w.start - 1] and w.start > document:
                carried_windows += 1
                assert not torch.allclose(rows[w.first], uncarried[w.first - w.start - 1], atol=1e-4)
        assert carried_windows >= 2


# --- settings -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("env, message", [
    (dict(ARCHITECTURE="skc", SKC_CHUNK=5), "SKC_CHUNK=5 must divide TRAIN_SEQ_LEN=16"),
    (dict(CAPSULE_ENABLED=1, CAPSULE_NUM=0), "CAPSULE_ENABLED=1 needs CAPSULE_NUM >= 1"),
    (dict(ARCHITECTURE="hybrid", SKC_LAYERS="1,4"), "SKC_LAYERS='1,4' names layer 4, outside 0..3"),
    (dict(ARCHITECTURE="hybrid", SKC_LAYERS="a"), "must be comma-separated layer indices"),
    (dict(ARCHITECTURE="hybrid", SKC_LAYERS="0,1,2,3"), "needs SKC and attention layers"),
    (dict(ARCHITECTURE="skc", SKC_LAYERS="1"), "set ARCHITECTURE=hybrid"),
    (dict(ARCHITECTURE="mamba"), "ARCHITECTURE='mamba' must be one of transformer, skc, hybrid"),
    (dict(SKC_SPECTRAL_WEIGHT=0.1), "SKC_SPECTRAL_WEIGHT acts on the SKC mixers"),
    (dict(KOOPMAN_ENABLED=1), "set CAPSULE_ENABLED=1"),
    (dict(FEEDBACK_PASSES=1), "set CAPSULE_ENABLED=1"),
    (dict(CAPSULE_ENABLED=1, CAPSULE_NUM=8, CAPSULE_DIM=6, KOOPMAN_ENABLED=1), "power-of-two CAPSULE_DIM"),
    (dict(**CAPSULES, KOOPMAN_ENABLED=1, KOOPMAN_RANK=9), "KOOPMAN_RANK=9 must be at most CAPSULE_DIM=8"),
    (dict(**CAPSULES, KOOPMAN_ENABLED=1, KOOPMAN_CONSISTENCY_WEIGHT=0.1), "FEEDBACK_PASSES >= 1"),
    (dict(**CAPSULES, ADAPTIVE_HALT_ENABLED=1), "ADAPTIVE_HALT_ENABLED=1 halts feedback passes"),
    (dict(CAPSULE_ENABLED=1, CAPSULE_NUM=3, CAPSULE_DIM=5), "must divide by TERNARY_GROUP_SIZE=16"),
    (dict(CAPSULE_CARRY=1), "CAPSULE_CARRY=1 carries the encoder's capsule sums"),
    (dict(**CAPSULES, FEEDBACK_PASSES=1, CAPSULE_CARRY=1), "needs CAPSULE_ENABLED=1 and FEEDBACK_PASSES=0"),
    (dict(**CAPSULES, CAPSULE_CARRY=1, CAPSULE_CARRY_DECAY=0), "CAPSULE_CARRY_DECAY must be above 0"),
    (dict(SHARED_BLOCKS=4), "SHARED_BLOCKS=4 must be below NUM_LAYERS=4"),
    (dict(SHARED_BLOCKS=2, XSA_LAST_N=1), "XSA_LAST_N, VRL_ENABLED and MOE_ENABLED choose per layer"),
    (dict(ARCHITECTURE="hybrid", SKC_LAYERS="0,1", SHARED_BLOCKS=2), "must repeat with that period"),
    (dict(RECURRENCE_DEPTH=1, RECURRENCE_LAYERS="2-7"), "names layer 4, outside 0..3"),
    (dict(RECURRENCE_DEPTH=1, RECURRENCE_LAYERS="3-1"), "must be an inclusive range lo-hi"),
    (dict(RECURRENCE_LAYERS="1-2"), "RECURRENCE_LAYERS needs RECURRENCE_DEPTH >= 1"),
    (dict(MOE_ENABLED=1, RECURRENCE_DEPTH=1), "are not supported with it"),
    (dict(CURRICULUM_ENABLED=1), "CURRICULUM_ENABLED is a setting of the design that skc-golf does not take"),
    (dict(CURRICULUM_ENABLED=0), "sequence-length curriculum is not implemented"),
    (dict(TERNARY_NOISE_SCALE=0.1), "weight-noise training is not implemented"),
    (dict(FEEDBACK_PASES=1), "did you mean FEEDBACK_PASSES"),
    (dict(KOOPMAN_RNK=2), "did you mean KOOPMAN_RANK"),
])
def test_bad_skc_settings_fail_at_start_with_a_message(env, message):
    with pytest.raises(train_gpt.ConfigError, match=re.escape(message)):
        make_args(**env)


def test_the_designs_architecture_name_is_an_alias_of_skc():
    assert make_args(ARCHITECTURE="skc_competition", SKC_CHUNK=4).architecture == "skc"


# --- a CPU run ----------------------------------------------------------------------------------------------

def test_architecture_skc_trains_exports_and_round_trips_on_the_cpu(tiny_data):
    env = tiny_data.env(RUN_ID="skc", ARCHITECTURE="skc", SKC_CHUNK=8, CAPSULE_ENABLED=1, CAPSULE_NUM=4,
                        CAPSULE_DIM=8, KOOPMAN_ENABLED=1, FEEDBACK_PASSES=1, KOOPMAN_CONSISTENCY_WEIGHT=0.1,
                        ADAPTIVE_HALT_ENABLED=1, SKC_SPECTRAL_WEIGHT=0.01, RECURRENCE_DEPTH=1,
                        RECURRENCE_START_FRACTION=0.5, FEEDBACK_EVERY=2, ITERATIONS=4, WARMUP_STEPS=2,
                        SLIDING_EVAL_STRIDE=16)
    train_gpt.main(env)
    log = (tiny_data.root / "logs" / "skc.txt").read_text()
    assert "param_group:koopman tensors:3" in log
    assert re.search(r"^recurrence: depth 1 over layers \[\d+, \d+\] from step \d+", log, re.M)
    prequant = float(re.search(r"^final_prequant val_loss:\S+ val_bpb:([\d.]+)", log, re.M).group(1))
    roundtrip = float(re.search(r"^final_ternary_\w+_roundtrip val_loss:\S+ val_bpb:([\d.]+)", log, re.M).group(1))
    assert roundtrip == pytest.approx(prequant, rel=0.05)
    assert re.search(r"^final_sliding_window val_loss:\S+ val_bpb:[\d.]+", log, re.M)
