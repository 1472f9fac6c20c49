"""Legality proofs for every evaluation mode, as the challenge's reviewers state the rules:
(C1) the prediction of target t depends only on the artifact and the tokens before t; (C2) it is a full
normalised softmax; (C3) a target is scored before any update that uses it; (C4) each target is scored
exactly once. Plus document boundaries, byte counts, warm-up hygiene and batch/world-size invariance."""
import hashlib
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train_gpt
from tiny_lm import REPO_ROOT_FOR_TESTS, subprocess_env

VOCAB, SEQ_LEN, NUM_TARGETS = 64, 16, 150
CPU = train_gpt.Runtime(0, 1, 0, torch.device("cpu"), False)

# Every evaluation mode, as (name, eval settings, run_eval_mode options).
MODES = {
    "chunked": ({}, dict(kind="windows", stride=SEQ_LEN)),
    "sliding": ({}, dict(kind="windows", stride=5)),
    "ttt_scalars": ({"TTT_ENABLED": 1, "TTT_SCOPE": "scalars"}, dict(kind="streaming")),
    "ttt_all": ({"TTT_ENABLED": 1, "TTT_SCOPE": "all", "TTT_LR": 0.05}, dict(kind="streaming")),
    "eval_engram": ({"EVAL_ENGRAM": 1, "EVAL_ENGRAM_ORDER": 3}, dict(kind="streaming")),
    "eval_engram_backoff": ({"EVAL_ENGRAM": 1, "EVAL_ENGRAM_ORDER": 4, "EVAL_ENGRAM_BACKOFF": 2.0},
                            dict(kind="streaming")),
    "eval_engram_linear": ({"EVAL_ENGRAM": 1, "EVAL_ENGRAM_ORDER": 6, "EVAL_ENGRAM_BACKOFF": 1.0,
                            "EVAL_ENGRAM_MIX": "linear", "EVAL_ENGRAM_WEIGHT": 0.5}, dict(kind="streaming")),
    "ttt_eval_engram": ({"TTT_ENABLED": 1, "TTT_SCOPE": "all", "EVAL_ENGRAM": 1, "SLIDING_EVAL_STRIDE": 6},
                        dict(kind="streaming")),
}
# Score-first chunks with no update between them: the only state that crosses chunks is the evaluation's own (the
# capsule carry). Test-time training and the n-gram memory learn from earlier chunks, which is legal and crosses
# documents, so the document-locality test uses this mode instead of theirs.
DOCUMENT_LOCALITY_MODES = {"chunked": MODES["chunked"], "sliding": MODES["sliding"],
                           "streaming": ({}, dict(kind="streaming"))}
EVERY_MODE = {**MODES, **DOCUMENT_LOCALITY_MODES}
SKC_CAPSULES = {"CAPSULE_ENABLED": 1, "CAPSULE_NUM": 4, "CAPSULE_DIM": 8}
# Every setting that changes the forward pass.
MODEL_FLAGS = {
    "base": {},
    "factored_embedding": {"EMBED_DIM": 16},
    "turbo_quant": {"TURBO_QUANT_TRAIN": 1},
    "temperature": {"EVAL_TEMPERATURE_FIT": 1},
    "partial_rope_leaky": {"ROPE_DIMS": 4, "MLP_ACT": "leaky_relu2", "SOFTCAP_TYPE": "poly"},
    "full_precision": {"WEIGHT_QUANT": "none"},
    "engram_2x2": {"ENGRAM_ENABLED": 1, "ENGRAM_DIM": 16, "ENGRAM_BUCKETS": 64, "ENGRAM_LAYER": 0},
    "engram_3x2": {"ENGRAM_ENABLED": 1, "ENGRAM_NUM_ORDERS": 3, "ENGRAM_DIM": 48, "ENGRAM_BUCKETS": 64,
                   "ENGRAM_LAYER": 0},
    "bigram_hash": {"BIGRAM_HASH_ENABLED": 1, "ENGRAM_NUM_HEADS": 1, "ENGRAM_NUM_ORDERS": 1, "BIGRAM_HASH_DIM": 16,
                    "BIGRAM_HASH_BUCKETS": 64, "ENGRAM_LAYER": 0},
    "moe_top1": {"MOE_ENABLED": 1, "MOE_NUM_EXPERTS": 3},
    "moe_top2": {"MOE_ENABLED": 1, "MOE_NUM_EXPERTS": 3, "MOE_TOP_K": 2, "MOE_LAYER_FRAC": 1.0},
    "xsa": {"XSA_LAST_N": 2},
    "vrl": {"VRL_ENABLED": 1},
    "smear_gate": {"SMEAR_GATE": 1},
    "ln_scale_damping": {"LN_SCALE_DAMPING": 1},
    # the SKC model (issue 9): the mixer alone, then each component on top of it
    "skc": {"ARCHITECTURE": "skc", "SKC_CHUNK": 4},
    "hybrid_parallel_residual": {"ARCHITECTURE": "hybrid", "SKC_CHUNK": 8, "SKC_PARALLEL_RESIDUAL": 1},
    "skc_capsules": {"ARCHITECTURE": "skc", "SKC_CHUNK": 4, **SKC_CAPSULES},
    "skc_koopman_feedback": {"ARCHITECTURE": "skc", "SKC_CHUNK": 8, **SKC_CAPSULES, "KOOPMAN_ENABLED": 1,
                             "FEEDBACK_PASSES": 2},
    "skc_adaptive_halt": {"ARCHITECTURE": "skc", "SKC_CHUNK": 4, **SKC_CAPSULES, "KOOPMAN_ENABLED": 1,
                          "FEEDBACK_PASSES": 2, "ADAPTIVE_HALT_ENABLED": 1, "ADAPTIVE_HALT_THRESHOLD": 0.05},
    "skc_shared_recurrence": {"ARCHITECTURE": "skc", "SKC_CHUNK": 4, "SHARED_BLOCKS": 1, "RECURRENCE_DEPTH": 1},
    "attention_capsules": {**SKC_CAPSULES, "SKC_CHUNK": 4},
    "attention_capsules_feedback": {**SKC_CAPSULES, "SKC_CHUNK": 4, "FEEDBACK_PASSES": 1},
    "attention_capsule_carry": {**SKC_CAPSULES, "SKC_CHUNK": 4, "CAPSULE_CARRY": 1, "CAPSULE_CARRY_DECAY": 0.9},
    "skc_capsule_carry": {"ARCHITECTURE": "skc", "SKC_CHUNK": 4, **SKC_CAPSULES, "CAPSULE_CARRY": 1},
}
# Models whose every token mixer is document-local (no attention layer): no prediction sees an earlier document.
DOCUMENT_LOCAL_FLAGS = [flag for flag, settings in MODEL_FLAGS.items() if settings.get("ARCHITECTURE") == "skc"]


def make_args(**overrides):
    env = dict(NUM_LAYERS=2, MODEL_DIM=32, NUM_HEADS=2, NUM_KV_HEADS=1, MLP_MULT=2, TERNARY_GROUP_SIZE=16,
               TRAIN_SEQ_LEN=SEQ_LEN, EVAL_CHUNK_TOKENS=40, VAL_BATCH_SIZE=4 * SEQ_LEN, VOCAB_SIZE=VOCAB)
    env.update(overrides)
    return train_gpt.Hyperparameters({k: str(v) for k, v in env.items()})


def make_model(args, seed=0):
    torch.manual_seed(seed)
    model = train_gpt.GPT(args, VOCAB)
    for p in model.parameters():
        p.data.add_(torch.randn_like(p) * 0.1)
    if model.logit_temperature is not None:
        model.logit_temperature.fill_(0.8)
    if args.capsule_enabled:  # open the adapter (it starts nearly closed), so that a leak through it would show
        with torch.no_grad():
            model.capsules.gate.fill_(2.0)
    return model


def make_stream(seed=0):
    """NUM_TARGETS + 1 tokens in documents of varying length, each starting with BOS."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(4, VOCAB, size=NUM_TARGETS + 1)
    tokens[[0, 23, 24, 61, 100, 131]] = train_gpt.BOS_ID
    return tokens.astype(np.uint16)


def uniform_tables():
    ones = torch.ones(VOCAB, dtype=torch.int16)
    return train_gpt.ByteTables(ones, torch.zeros(VOCAB, dtype=torch.bool), torch.zeros(VOCAB, dtype=torch.bool))


def distributions(model, tokens, mode, args, events=None):
    """{target: full log-distribution} for every scored target, and the mode's ScoredTargets."""
    ctx = train_gpt.stream_context(tokens, uniform_tables(), args.eval_len, args.val_batch_size, CPU)
    rows = {}

    def observer(targets, logp):
        for t, row in zip(targets.tolist(), logp):
            assert t not in rows, f"target {t} scored twice"
            rows[t] = row.clone()
    part = train_gpt.run_eval_mode(model, ctx, EVERY_MODE[mode][1], args, CPU, observer=observer, events=events)
    return rows, part


COMBINATIONS = [(mode, flag) for mode in MODES for flag in MODEL_FLAGS]


@pytest.mark.parametrize("mode, flag", COMBINATIONS)
def test_c1_prediction_depends_only_on_earlier_tokens(mode, flag):
    args = make_args(**MODES[mode][0], **MODEL_FLAGS[flag])
    model = make_model(args)
    tokens = make_stream()
    before, _ = distributions(model, tokens, mode, args)
    for t in (7, 45, 90):
        changed = tokens.copy()
        changed[t] = (int(tokens[t]) + 7) % (VOCAB - 4) + 4
        after, _ = distributions(model, changed, mode, args)
        for target in range(1, t + 1):
            assert torch.equal(before[target], after[target]), f"target {target} saw token {t}"
        assert not torch.equal(before[t + 1], after[t + 1]), "the perturbation must reach the next prediction"


@pytest.mark.parametrize("mode, flag", [(mode, flag) for mode in DOCUMENT_LOCALITY_MODES for flag in DOCUMENT_LOCAL_FLAGS])
def test_document_local_models_never_see_an_earlier_document(mode, flag):
    """A perturbation inside a document leaves every prediction after the next BOS bit-identical."""
    args = make_args(**DOCUMENT_LOCALITY_MODES[mode][0], **MODEL_FLAGS[flag])
    model = make_model(args)
    tokens = make_stream()
    before, _ = distributions(model, tokens, mode, args)
    bos = np.flatnonzero(tokens == train_gpt.BOS_ID)
    for doc_start, next_start in ((0, 23), (24, 61), (61, 100)):
        changed = tokens.copy()
        inner = np.arange(doc_start + 1, next_start)
        changed[inner] = (tokens[inner].astype(int) + 11) % (VOCAB - 4) + 4
        after, _ = distributions(model, changed, mode, args)
        assert next_start in bos
        assert all(torch.equal(before[t], after[t]) for t in range(next_start + 1, NUM_TARGETS + 1)), (flag, doc_start)
        assert not torch.equal(before[next_start], after[next_start])


@pytest.mark.parametrize("mode", MODES)
def test_c2_every_prediction_is_a_normalised_distribution(mode):
    args = make_args(**MODES[mode][0], EVAL_TEMPERATURE_FIT=1, SOFTCAP_TYPE="poly")
    rows, _ = distributions(make_model(args), make_stream(), mode, args)
    sample = np.random.default_rng(0).choice(sorted(rows), size=40, replace=False)
    for target in sample:
        assert abs(float(rows[int(target)].double().exp().sum()) - 1.0) < 1e-5


@pytest.mark.parametrize("mode", MODES)
def test_c4_each_target_is_scored_exactly_once(mode):
    args = make_args(**MODES[mode][0])
    rows, part = distributions(make_model(args), make_stream(), mode, args)
    counts = np.bincount(part.targets.numpy(), minlength=NUM_TARGETS + 1)
    assert counts[0] == 0 and (counts[1:] == 1).all()
    assert sorted(rows) == list(range(1, NUM_TARGETS + 1))
    assert part.losses.numel() == NUM_TARGETS


@pytest.mark.parametrize("mode", ["ttt_all", "ttt_eval_engram"])
def test_c3_ttt_trains_only_on_scored_chunks(mode):
    args = make_args(**MODES[mode][0])
    events = []
    distributions(make_model(args), make_stream(), mode, args, events=events)
    scored_up_to, trained = 1, 0
    for event in events:
        if event[0] == "score":
            _, lo, hi = event
            assert lo == scored_up_to, "chunks are scored in order, with no gap"
            scored_up_to = hi
        else:
            _, lo, hi, first_target, last_target = event
            assert hi == scored_up_to, "an update follows the scoring of its own chunk"
            assert last_target < scored_up_to, "an update uses only targets already scored (chunks <= i)"
            trained += 1
    assert trained >= 2 and scored_up_to == NUM_TARGETS + 1


def test_ttt_changes_predictions_of_later_chunks_only():
    args = make_args(**MODES["ttt_all"][0])
    model = make_model(args)
    with_ttt, _ = distributions(model, make_stream(), "ttt_all", args)
    without, _ = distributions(model, make_stream(), "chunked", args)
    first_chunk = range(1, args.eval_chunk_tokens + 1)
    assert all(torch.allclose(with_ttt[t], without[t], atol=1e-6) for t in first_chunk)
    assert any(not torch.allclose(with_ttt[t], without[t], atol=1e-6) for t in range(args.eval_chunk_tokens + 1, 151))


# Token-mixing state that must reset at BOS: (name, function of the stream -> per-position state).
# Later features (smear, EngramHash keys, SKC scan, capsule/Koopman state, convolutions) add themselves here.
def eval_engram_keys(order, backoff=0.0):
    def keys(tokens):
        args = make_args(EVAL_ENGRAM=1, EVAL_ENGRAM_ORDER=order, EVAL_ENGRAM_BACKOFF=backoff)
        ctx = train_gpt.stream_context(tokens, uniform_tables(), SEQ_LEN, 64, CPU)
        engram = train_gpt.EvalEngram(args, VOCAB, CPU.device)
        return torch.stack(engram.context_keys(ctx.val, ctx.last_bos, torch.arange(1, ctx.val.numel())), dim=-1)
    return keys


def engram_memory(orders, heads):
    """EngramHash rows at each input position (position i predicts target i+1)."""
    def memory(tokens):
        args = make_args(ENGRAM_ENABLED=1, ENGRAM_NUM_ORDERS=orders, ENGRAM_NUM_HEADS=heads, ENGRAM_DIM=16 * orders * heads,
                         ENGRAM_BUCKETS=64, ENGRAM_LAYER=0)
        engram = make_model(args).engram
        with torch.no_grad():
            return engram.memory(torch.from_numpy(tokens[:-1].astype(np.int64))[None])[0]
    return memory


def smeared_embeddings(tokens):
    args = make_args(SMEAR_GATE=1)
    model = make_model(args)
    ids = torch.from_numpy(tokens[:-1].astype(np.int64))[None]
    with torch.no_grad():
        return model.smear(F.embedding(ids, model.tok_emb.weight), ids)[0]


def skc_state(component):
    """Per-position output of an SKC component over the whole stream as one sequence (150 positions: not a multiple
    of the scan chunk, so the padded tail is exercised too)."""
    def state(tokens):
        args = make_args(ARCHITECTURE="skc", SKC_CHUNK=4, **SKC_CAPSULES, KOOPMAN_ENABLED=1, KOOPMAN_RANK=2)
        torch.manual_seed(0)
        table = torch.randn(VOCAB, args.model_dim)
        mixer, capsules, koopman = train_gpt.SKCMixer(args), train_gpt.CapsuleBank(args), train_gpt.KoopmanDynamics(args)
        with torch.no_grad():
            koopman.left.normal_()  # a low-rank part that mixes capsule channels
        ids = torch.from_numpy(tokens[:-1].astype(np.int64)).unsqueeze(0)
        ctx = train_gpt.ForwardContext()
        ctx.doc_starts = train_gpt.document_starts(ids)
        with torch.no_grad():
            if component == "capsules_koopman":
                return koopman(capsules.summarize(table[ids], ctx.doc_starts))[0]
            return mixer(table[ids], ctx)[0]
    return state


BOS_RESET_STATE = {**{f"eval_engram_order{n}": eval_engram_keys(n) for n in (2, 3, 4)},
                   "eval_engram_backoff_orders_2_to_4": eval_engram_keys(4, backoff=2.0),
                   **{f"engram_hash_{o}x{h}": engram_memory(o, h) for o, h in ((1, 1), (2, 2), (3, 2), (4, 1))},
                   "smear_gate": smeared_embeddings,
                   **{f"skc_{part}": skc_state(part) for part in ("scan_and_conv", "capsules_koopman")}}


@pytest.mark.parametrize("component", BOS_RESET_STATE)
def test_state_does_not_cross_a_document_boundary(component):
    tokens = make_stream()
    bos = np.flatnonzero(tokens == train_gpt.BOS_ID)
    state = BOS_RESET_STATE[component]
    for doc_start, next_start in zip(bos[:-1], bos[1:]):
        changed = tokens.copy()
        inner = np.arange(doc_start + 1, next_start)
        changed[inner] = (tokens[inner].astype(int) + 11) % (VOCAB - 4) + 4
        end = bos[np.searchsorted(bos, next_start) + 1] if next_start != bos[-1] else len(tokens)
        following = slice(next_start, end - 1)  # targets next_start+1 .. end-1, indexed from target 1
        assert torch.equal(state(tokens)[following], state(changed)[following]), (component, doc_start)


def test_temperature_reaches_the_logits():
    args = make_args(EVAL_TEMPERATURE_FIT=1)
    model = make_model(args)
    losses = []
    for temperature in (1.0, 0.8):
        model.logit_temperature.fill_(temperature)
        _, part = distributions(model, make_stream(), "chunked", args)
        losses.append(float(part.losses.sum()))
    assert losses[0] != pytest.approx(losses[1], rel=1e-4)


def test_eval_warm_up_never_changes_the_weights():
    args = make_args(TTT_ENABLED=1)
    model = make_model(args)
    ctx = train_gpt.stream_context(make_stream(), uniform_tables(), SEQ_LEN, 64, CPU)

    def digest():
        return hashlib.sha256(b"".join(t.detach().numpy().tobytes() for t in model.state_dict().values())).hexdigest()
    before = digest()
    train_gpt.warm_up_eval(model, ctx, args, CPU)
    assert digest() == before
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("flag", ["base", "attention_capsule_carry"])
def test_sliding_scores_do_not_depend_on_the_batch_size(flag):
    args = make_args(**MODEL_FLAGS[flag])
    model = make_model(args)
    results = []
    for batch_tokens in (SEQ_LEN, 3 * SEQ_LEN, 64 * SEQ_LEN):
        ctx = train_gpt.stream_context(make_stream(), uniform_tables(), SEQ_LEN, batch_tokens, CPU)
        results.append(train_gpt.evaluate_windows(model, ctx, 5, CPU).losses)
    for other in results[1:]:
        assert torch.allclose(results[0], other, rtol=0, atol=1e-6)


def test_dumped_losses_match_the_score_and_count_the_decoded_bytes(tiny_data):
    env = tiny_data.env(RUN_ID="dump", ITERATIONS=3, SLIDING_EVAL_STRIDE=8,
                        EVAL_DUMP_TOKEN_LOSSES=str(tiny_data.root / "dump" / "losses.npz"))
    train_gpt.main(env)
    log = (tiny_data.root / "logs" / "dump.txt").read_text()
    stream = train_gpt.read_shard(tiny_data.data_path / "fineweb_val_000000.bin")
    for key in ("final_prequant", "final_ternary_brotli_roundtrip", "final_sliding_window"):
        dump = np.load(tiny_data.root / "dump" / f"losses_{key}.npz")
        assert np.array_equal(dump["targets"], np.arange(1, dump["targets"].size + 1))
        bpb = float(re.search(rf"^{key}_exact val_loss:\S+ val_bpb:([\d.]+)", log, re.M).group(1))
        assert dump["loss_nats"].astype(np.float64).sum() / np.log(2) / dump["bytes"].sum() == pytest.approx(bpb, rel=1e-6)
    bos = np.flatnonzero(stream == train_gpt.BOS_ID)
    for doc_start, next_start in list(zip(bos[:-1], bos[1:]))[:20]:
        ids = stream[doc_start + 1:next_start].tolist()
        counted = dump["bytes"][doc_start:next_start - 1].sum()  # targets doc_start+1 .. next_start-1
        assert counted == len(tiny_data.sp.decode(ids).encode("utf-8"))


def test_sliding_scores_match_across_one_and_two_processes(tiny_data):
    args = train_gpt.Hyperparameters(tiny_data.env(VOCAB_SIZE=tiny_data.sp.vocab_size()))
    artifact = tiny_data.root / "invariance.skc"
    artifact.write_bytes(train_gpt.export_model(make_model_for(args), args, train_gpt.Logger(None)).blob)
    figures = []
    for nproc in (1, 2):
        env = subprocess_env(tiny_data.env(RUN_ID=f"inv{nproc}", EVAL_ARTIFACT=str(artifact), SLIDING_EVAL_STRIDE=8))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "train_gpt.py"]
        result = subprocess.run(cmd, cwd=REPO_ROOT_FOR_TESTS, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        log = (tiny_data.root / "logs" / f"inv{nproc}.txt").read_text()
        figures.append(float(re.search(r"final_sliding_window_exact val_loss:([\d.]+)", log).group(1)))
    assert figures[0] == pytest.approx(figures[1], rel=1e-7)


def make_model_for(args):
    torch.manual_seed(0)
    model = train_gpt.GPT(args, args.vocab_size)
    for p in model.parameters():
        p.data.add_(torch.randn_like(p) * 0.05)
    return model
