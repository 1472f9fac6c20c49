"""A tiny generated corpus, its SentencePiece tokenizer and competition-format shards.

Shared by the tests (tests/tiny_lm.py) and build_submission.py (the equivalence check and the
legality suite run on it), so that nothing depends on downloaded data.
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np

import train_gpt

WORDS = ("the cat sat on a mat while dogs ran over hills and rivers under bright skies ; numbers like 12 or 345 "
         "follow words , and café naïve façade — “quotes” 東京 €").split()


def make_documents(count: int, seed: int) -> list[str]:
    """Short English-like documents with digits and non-ASCII characters (exercising byte fallback)."""
    rng = random.Random(seed)
    docs = []
    for _ in range(count):
        sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))).capitalize() + "."
                     for _ in range(rng.randint(1, 4))]
        docs.append(" ".join(sentences))
    return docs


def train_tokenizer(out_dir: Path, docs: list[str], vocab_size: int = 320):
    import sentencepiece as spm
    prefix = out_dir / "tiny"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(docs), model_prefix=str(prefix), vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, split_digits=True, normalization_rule_name="nmt_nfkc", add_dummy_prefix=False,
        pad_id=0, bos_id=1, eos_id=2, unk_id=3, character_coverage=1.0, hard_vocab_limit=False,
        num_threads=1, minloglevel=2)
    return spm.SentencePieceProcessor(model_file=str(prefix) + ".model"), str(prefix) + ".model"


def document_stream(sp, docs: list[str]) -> np.ndarray:
    """The official convention: each document is BOS (1) followed by its ids, no EOS."""
    out = []
    for ids in sp.encode(docs):
        out.append(1)
        out.extend(ids)
    return np.array(out, dtype=np.uint16)


class TinyData:
    def __init__(self, root: Path):
        self.root = root
        self.train_docs = make_documents(1500, seed=1)
        # characters the tokenizer never saw, so validation exercises byte-fallback pieces
        self.val_docs = [doc + (" Ωμέγα 🦊." if i % 3 == 0 else "") for i, doc in enumerate(make_documents(120, seed=2))]
        self.sp, self.tokenizer_path = train_tokenizer(root, self.train_docs)
        self.data_path = root / "shards"
        train_gpt.write_shard(self.data_path / "fineweb_train_000000.bin", document_stream(self.sp, self.train_docs))
        train_gpt.write_shard(self.data_path / "fineweb_val_000000.bin", document_stream(self.sp, self.val_docs))

    def env(self, **overrides) -> dict[str, str]:
        """A tiny CPU configuration for this data."""
        env = dict(DATA_PATH=str(self.data_path), TOKENIZER_PATH=self.tokenizer_path, NUM_LAYERS="2", MODEL_DIM="64",
                   NUM_HEADS="2", NUM_KV_HEADS="1", MLP_MULT="2", TERNARY_GROUP_SIZE="32", TRAIN_SEQ_LEN="32",
                   TRAIN_BATCH_TOKENS="1024", ITERATIONS="8", WARMUP_STEPS="1", WARMDOWN_ITERS="0",
                   MAX_WALLCLOCK_SECONDS="0", VAL_LOSS_EVERY="0", VAL_BATCH_SIZE="4096", TRAIN_LOG_EVERY="1",
                   RUN_ID="test", LOG_DIR=str(self.root / "logs"), MODEL_COMPILE="0")
        env.update({k: str(v) for k, v in overrides.items()})
        return env
