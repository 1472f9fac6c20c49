"""The EvalEngram memory's n-gram distribution against a count by hand: Laplace smoothing of the top order, and
with EVAL_ENGRAM_BACKOFF each order smoothed towards the one below. Legality (score-first, BOS) is proved in
test_eval_legality.py; this file checks the arithmetic."""
import math
from collections import Counter

import numpy as np
import pytest
import torch

import train_gpt

VOCAB, BOS = 8, train_gpt.BOS_ID
CPU = torch.device("cpu")


def memory(order, backoff, alpha=0.5, mix="log"):
    # Buckets above (VOCAB + 1) ** 2: no two contexts of order <= 3 share a bucket, so the hand count is exact.
    args = train_gpt.Hyperparameters({"EVAL_ENGRAM": "1", "EVAL_ENGRAM_ORDER": str(order), "EVAL_ENGRAM_ALPHA": str(alpha),
                                      "EVAL_ENGRAM_BACKOFF": str(backoff), "EVAL_ENGRAM_BUCKETS": "1000",
                                      "EVAL_ENGRAM_MIX": mix, "VOCAB_SIZE": str(VOCAB)})
    return train_gpt.EvalEngram(args, VOCAB, CPU)


def stream(seed=0, length=400):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(2, 5, size=length)  # a small alphabet, so contexts repeat
    tokens[rng.random(length) < 0.05] = BOS
    tokens[0] = BOS
    val = torch.from_numpy(tokens.astype(np.int64))
    positions = torch.arange(val.numel())
    last_bos = torch.cummax(torch.where(val == BOS, positions, torch.full_like(positions, -1)), dim=0).values
    return val, last_bos


def context(val, last_bos, t, length):
    """The `length` tokens before target t, a padding id where they lie before t's document."""
    return tuple(int(val[t - back]) if t - back >= 0 and t - back >= last_bos[t - 1] else VOCAB
                 for back in range(1, length + 1))


def hand_distribution(val, last_bos, absorbed, t, order, backoff, alpha):
    counts = {k: Counter() for k in range(2, order + 1)}
    for s in absorbed:
        for k in counts:
            counts[k][context(val, last_bos, s, k - 1), int(val[s])] += 1
    orders = range(2, order + 1) if backoff > 0 else [order]
    q = None
    for k in orders:
        key = context(val, last_bos, t, k - 1)
        c = torch.tensor([counts[k][key, v] for v in range(VOCAB)], dtype=torch.float64)
        n = c.sum()
        q = (c + alpha) / (n + alpha * VOCAB) if q is None else (c + backoff * q) / (n + backoff)
    return q


@pytest.mark.parametrize("order, backoff, mix", [(2, 0.0, "log"), (3, 0.0, "log"), (3, 2.0, "log"), (3, 0.5, "log"),
                                                (3, 2.0, "linear")])
def test_mixed_distribution_counts_every_earlier_target(order, backoff, mix):
    val, last_bos = stream()
    engram, absorbed = memory(order, backoff, mix=mix), torch.arange(1, 300)
    engram.absorb(engram.context_keys(val, last_bos, absorbed), val[absorbed])
    targets = torch.arange(300, 400)
    logp = torch.log_softmax(torch.randn(targets.numel(), VOCAB, generator=torch.Generator().manual_seed(1)), -1)
    mixed = engram.mix(logp, engram.context_keys(val, last_bos, targets), val[targets])
    assert torch.allclose(mixed.exp().sum(-1), torch.ones(targets.numel()), atol=1e-5)
    for row, t in enumerate(targets.tolist()):  # the call's earlier rows count too
        q = hand_distribution(val, last_bos, list(range(1, t)), t, order, backoff, 0.5)
        entropy = -(logp[row].exp() * logp[row]).sum()
        gate = engram.weight * torch.sigmoid(entropy - engram.center)
        if mix == "linear":
            expected = torch.log((1 - gate.double()) * logp[row].double().exp() + gate.double() * q)
        else:
            expected = torch.log_softmax(logp[row].double() + gate.double() * torch.log(q), -1)
        assert torch.allclose(mixed[row].double(), expected, atol=1e-5), t


def test_backoff_off_counts_only_the_top_order():
    assert len(memory(4, 0.0).counts) == 1 and len(memory(4, 1.0).counts) == 3


@pytest.mark.parametrize("backoff", [0.0, 2.0])
def test_scoring_in_one_call_or_many_gives_the_same_distributions(backoff):
    """Counts are online: cutting the targets into calls anywhere changes nothing."""
    val, last_bos = stream(seed=2)
    targets = torch.arange(1, 400)
    logp = torch.log_softmax(torch.randn(targets.numel(), VOCAB, generator=torch.Generator().manual_seed(3)), -1)
    whole = memory(3, backoff).score(logp, val, last_bos, targets)
    engram, parts = memory(3, backoff), []
    for lo, hi in ((0, 1), (1, 57), (57, 64), (64, 399)):
        parts.append(engram.score(logp[lo:hi], val, last_bos, targets[lo:hi]))
    assert torch.allclose(torch.cat(parts), whole, atol=1e-6)


def test_backoff_follows_the_shorter_context_where_the_longer_one_is_new():
    """A trigram context never seen backs off to its bigram; without backoff it is uniform."""
    val = torch.tensor([BOS, 2, 3, 4, 2, 3, 4, 2, 3, 4, 6, 4, 5])
    positions = torch.arange(val.numel())
    last_bos = torch.cummax(torch.where(val == BOS, positions, torch.full_like(positions, -1)), dim=0).values
    target = torch.tensor([12])  # context "6 4": the trigram is new, the bigram "4 -> 2" was seen twice
    flat = torch.full((1, VOCAB), -math.log(VOCAB))
    for backoff, favours_2 in ((0.0, False), (1.0, True)):
        engram = memory(3, backoff)
        engram.absorb(engram.context_keys(val, last_bos, torch.arange(1, 12)), val[1:12])
        mixed = engram.mix(flat, engram.context_keys(val, last_bos, target), val[target])[0]
        assert (mixed[2] > mixed[5] + 0.1) == favours_2


def test_long_contexts_stay_in_their_buckets():
    """Order 8 at a 1,024-token vocabulary: 1025 ** 7 would overflow int64 without the modular reduction."""
    vocab = 1024
    args = train_gpt.Hyperparameters({"EVAL_ENGRAM": "1", "EVAL_ENGRAM_ORDER": "8", "EVAL_ENGRAM_BACKOFF": "1",
                                      "EVAL_ENGRAM_BUCKETS": "64", "VOCAB_SIZE": str(vocab)})
    engram = train_gpt.EvalEngram(args, vocab, CPU)
    val = torch.full((64,), vocab - 1)
    val[0] = BOS
    keys = engram.context_keys(val, torch.zeros_like(val), torch.arange(1, 64))
    assert all(((k >= 0) & (k < b)).all() for k, b in zip(keys, engram.buckets))
    assert len(set(keys[-1][10:].tolist())) == 1  # a repeated context keeps one bucket
