"""Data pipeline: shards written by data/prepare.py against an independent copy of the
official competition loader, the document convention, the val/train split, the manifest,
shard validation errors and the offline default corpus. All data is generated here."""
import gzip
import hashlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

import train_gpt
from train_gpt import ShardError

VAL_DOCS = 6
TRAIN_DOCS = 34
TINY_VOCAB = 320
VAL_ONLY_CHAR = "\u2603"  # appears only in validation documents
WORDS = ("the of and to in is was for on that with as by at from his her an it be are this which or "
         "had not but were have one they all their model token shard golf 1984 2024").split()


# -----------------------------------------------------------------------------
# The official loader, rewritten from the format description (not imported from the project)
# -----------------------------------------------------------------------------
def official_load_data_shard(file: Path) -> np.ndarray:
    header_bytes = 256 * np.dtype("<i4").itemsize
    token_bytes = np.dtype("<u2").itemsize
    header = np.fromfile(file, dtype="<i4", count=256)
    if header.size != 256 or int(header[0]) != 20240520 or int(header[1]) != 1:
        raise ValueError(f"Unexpected shard header for {file}")
    num_tokens = int(header[2])
    expected_size = header_bytes + num_tokens * token_bytes
    if file.stat().st_size != expected_size:
        raise ValueError(f"Shard size mismatch for {file}: expected {expected_size} bytes")
    tokens = np.fromfile(file, dtype="<u2", count=num_tokens, offset=header_bytes)
    if tokens.size != num_tokens:
        raise ValueError(f"Short read for {file}")
    return tokens.astype(np.uint16, copy=False)


# -----------------------------------------------------------------------------
# A tiny generated corpus and one build of it, shared by the tests
# -----------------------------------------------------------------------------
def make_docs() -> list[str]:
    rng = random.Random(0)
    sentence = lambda: " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 15))).capitalize() + "."
    docs = ["\n".join(sentence() for _ in range(rng.randint(3, 12))) for _ in range(VAL_DOCS + TRAIN_DOCS)]
    for i in range(VAL_DOCS):
        docs[i] += " " + (VAL_ONLY_CHAR * 40 + " ") * 10
    return docs


def write_jsonl_gz(path: Path, docs: list[str]) -> None:
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for i, doc in enumerate(docs):
            f.write(json.dumps({"id": i, "text": doc}) + "\n")
            if i == 3:
                f.write(json.dumps({"id": "blank", "text": "   \n"}) + "\n")  # skipped: whitespace only


def shard_paths(out: Path, split: str) -> list[Path]:
    return sorted(out.glob(f"fineweb_{split}_*.bin"))


def split_stream(out: Path, split: str) -> np.ndarray:
    return np.concatenate([official_load_data_shard(p) for p in shard_paths(out, split)])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    docs = make_docs()
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl.gz"
    write_jsonl_gz(path, docs)
    return path, docs


@pytest.fixture(scope="module")
def built(prepare, corpus, tmp_path_factory):
    """One --spec build (trained tiny tokenizer) with small shards, so each split has several."""
    path, docs = corpus
    out = tmp_path_factory.mktemp("built")
    prepare.main(["build", "--input", str(path), "--spec", "sp_bpe_1024", "--vocab-size", str(TINY_VOCAB),
                  "--out", str(out), "--val-docs", str(VAL_DOCS), "--shard-tokens", "700"])
    return out, docs


# -----------------------------------------------------------------------------
# Format: byte-for-byte agreement with the official loader
# -----------------------------------------------------------------------------
def test_shards_read_identically_by_official_loader_and_read_shard(built):
    out, _ = built
    paths = shard_paths(out, "train") + shard_paths(out, "val")
    assert len(shard_paths(out, "train")) > 1 and len(shard_paths(out, "val")) > 1
    for path in paths:
        official = official_load_data_shard(path)
        ours = train_gpt.read_shard(path)
        assert ours.dtype == official.dtype == np.uint16
        assert np.array_equal(ours, official)
        raw = path.read_bytes()
        assert raw[:12] == np.array([20240520, 1, official.size], dtype="<i4").tobytes()
        assert raw[12:1024] == bytes(1012)
        assert raw[1024:] == official.astype("<u2").tobytes()


def test_shard_names_are_consecutive_and_full_except_last(built):
    out, _ = built
    for split in ("train", "val"):
        paths = shard_paths(out, split)
        assert [p.name for p in paths] == [f"fineweb_{split}_{i:06d}.bin" for i in range(len(paths))]
        sizes = [train_gpt.read_shard_header(p) for p in paths]
        assert all(size == 700 for size in sizes[:-1]) and 0 < sizes[-1] <= 700


def test_streams_are_bos_plus_ids_of_each_document_in_order(built):
    out, docs = built
    processor = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    for split, split_docs in (("val", docs[:VAL_DOCS]), ("train", docs[VAL_DOCS:])):
        expected = [tok for doc in split_docs for tok in [1] + processor.encode(doc)]
        stream = split_stream(out, split)
        assert stream.tolist() == expected
        assert int((stream == 1).sum()) == len(split_docs)  # one BOS per document
        assert not (stream == 2).any()  # no EOS
        assert int(stream.max()) < TINY_VOCAB


def test_validation_is_the_first_documents(built):
    out, docs = built
    processor = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    stream = split_stream(out, "val").tolist()
    starts = [i for i, tok in enumerate(stream) if tok == 1] + [len(stream)]
    decoded = [processor.decode(stream[a + 1:b]) for a, b in zip(starts, starts[1:])]
    assert len(decoded) == VAL_DOCS
    assert all(VAL_ONLY_CHAR in text for text in decoded)
    assert VAL_ONLY_CHAR not in processor.decode(split_stream(out, "train").tolist())


def test_tokenizer_is_trained_on_train_documents_only(prepare, built, tmp_path):
    out, docs = built
    processor = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    assert processor.get_piece_size() == TINY_VOCAB
    assert processor.piece_to_id(VAL_ONLY_CHAR) == processor.unk_id()  # never a piece: never seen
    # control: the same training on all documents does learn the character
    spec = prepare.get_spec("sp_bpe_1024")
    control = prepare.train_tokenizer(iter(docs), spec, tmp_path, TINY_VOCAB)
    control_processor = spm.SentencePieceProcessor(model_file=str(control))
    assert control_processor.piece_to_id(VAL_ONLY_CHAR) != control_processor.unk_id()


def test_tokenizer_training_is_repeatable(prepare, built, tmp_path):
    out, docs = built
    again = prepare.train_tokenizer(iter(docs[VAL_DOCS:]), prepare.get_spec("sp_bpe_1024"), tmp_path, TINY_VOCAB)
    assert again.read_bytes() == (out / "tokenizer.model").read_bytes()


def test_manifest_matches_the_shards(built, corpus):
    out, docs = built
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["spec"] == "sp_bpe_1024"
    assert manifest["vocab_size"] == TINY_VOCAB
    assert manifest["sources"] == [str(corpus[0].resolve())]
    assert Path(manifest["tokenizer_path"]) == (out / "tokenizer.model").resolve()
    assert manifest["tokenizer_sha256"] == hashlib.sha256((out / "tokenizer.model").read_bytes()).hexdigest()
    assert manifest["build_seconds"] > 0 and manifest["tokenizer_train_seconds"] > 0
    for split, split_docs in (("val", docs[:VAL_DOCS]), ("train", docs[VAL_DOCS:])):
        entry = manifest[split]
        assert entry["docs"] == entry["bos_tokens"] == len(split_docs)
        assert entry["utf8_bytes"] == sum(len(d.encode("utf-8")) for d in split_docs)
        assert entry["tokens"] == sum(train_gpt.read_shard_header(out / name) for name in entry["shards"])
        assert entry["shards"] == [p.name for p in shard_paths(out, split)]


def test_given_tokenizer_reproduces_the_trained_build(prepare, built, corpus, tmp_path):
    out, _ = built
    prepare.main(["build", "--input", str(corpus[0]), "--tokenizer", str(out / "tokenizer.model"),
                  "--out", str(tmp_path), "--val-docs", str(VAL_DOCS)])
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["spec"] is None and manifest["tokenizer_train_seconds"] == 0
    assert not (tmp_path / "tokenizer.model").exists()
    for split in ("train", "val"):
        assert [p.name for p in shard_paths(tmp_path, split)] == [f"fineweb_{split}_000000.bin"]
        assert np.array_equal(split_stream(tmp_path, split), split_stream(out, split))


def test_max_docs_caps_the_document_count(prepare, built, corpus, tmp_path):
    out, _ = built
    prepare.main(["build", "--input", str(corpus[0]), "--tokenizer", str(out / "tokenizer.model"),
                  "--out", str(tmp_path), "--val-docs", "2", "--max-docs", "5"])
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert (manifest["val"]["docs"], manifest["train"]["docs"]) == (2, 3)


# -----------------------------------------------------------------------------
# Inputs and checks
# -----------------------------------------------------------------------------
def test_txt_inputs_split_on_form_feed_lines_and_read_gzip(prepare, tmp_path):
    plain = tmp_path / "a.txt"
    plain.write_text("first doc\nline two\n\f\nsecond doc\n", encoding="utf-8")
    single = tmp_path / "b.txt.gz"
    with gzip.open(single, "wt", encoding="utf-8") as f:
        f.write("third doc, a whole file\n")
    assert list(prepare.iter_file_docs([plain, single])) == [
        "first doc\nline two\n", "second doc\n", "third doc, a whole file\n"]


def test_unknown_input_suffix_is_rejected(prepare, tmp_path):
    bad = tmp_path / "docs.csv"
    bad.write_text("x")
    with pytest.raises(SystemExit):
        list(prepare.iter_file_docs([bad]))


def test_token_ids_must_fit_the_vocab(prepare):
    assert prepare.document_tokens([5, 6], vocab_size=10).tolist() == [1, 5, 6]
    with pytest.raises(ShardError):
        prepare.document_tokens([5, 10], vocab_size=10)
    with pytest.raises(ShardError):
        prepare.document_tokens([70000], vocab_size=100000)


def test_build_refuses_an_empty_train_split(prepare, built, corpus, tmp_path):
    out, _ = built
    with pytest.raises(SystemExit):
        prepare.main(["build", "--input", str(corpus[0]), "--tokenizer", str(out / "tokenizer.model"),
                      "--out", str(tmp_path), "--val-docs", "1000"])
    with pytest.raises(SystemExit):
        prepare.main(["build", "--input", str(corpus[0]), "--tokenizer", str(out / "tokenizer.model"),
                      "--out", str(tmp_path), "--val-docs", "0"])


# -----------------------------------------------------------------------------
# One shard reader for everything: clear errors naming the file
# -----------------------------------------------------------------------------
def good_shard(tmp_path: Path) -> Path:
    path = tmp_path / "fineweb_val_000000.bin"
    train_gpt.write_shard(path, np.arange(1, 101, dtype=np.uint16))
    return path


def patch_header(path: Path, index: int, value: int) -> None:
    data = bytearray(path.read_bytes())
    data[4 * index:4 * index + 4] = np.array([value], dtype="<i4").tobytes()
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["magic", "version", "truncated", "count", "short_header"])
def test_damaged_shards_raise_shard_error_naming_the_file(tmp_path, damage):
    path = good_shard(tmp_path)
    if damage == "magic":
        patch_header(path, 0, 12345)
    elif damage == "version":
        patch_header(path, 1, 2)
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:-3])
    elif damage == "count":
        patch_header(path, 2, 99)
    else:
        path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ShardError, match=str(path)):
        train_gpt.read_shard(path)
    if damage != "short_header":
        with pytest.raises(ValueError):
            official_load_data_shard(path)


def test_missing_shard_raises_shard_error_naming_the_file(tmp_path):
    path = tmp_path / "fineweb_train_000007.bin"
    with pytest.raises(ShardError, match=str(path)):
        train_gpt.read_shard(path)


def test_good_shard_round_trips(tmp_path):
    path = good_shard(tmp_path)
    assert train_gpt.read_shard(path).tolist() == list(range(1, 101))
    assert official_load_data_shard(path).tolist() == list(range(1, 101))


# -----------------------------------------------------------------------------
# Offline default corpus, specs, command line
# -----------------------------------------------------------------------------
def test_offline_corpus_yields_documents_in_a_fixed_order(prepare):
    entries = prepare.offline_corpus_entries()
    names = [name for name, _ in entries]
    assert names == [name for name, _ in prepare.offline_corpus_entries()]
    assert any(n.startswith("pydoc_topic:") for n in names) and any(n.startswith("stdlib:") for n in names)
    assert not any("/test/" in n or "/tests/" in n or "site-packages" in n for n in names)
    texts = [load() for _, load in entries[:25]]
    assert sum(1 for t in texts if t.strip()) >= 20
    assert sum(len(t) for t in texts) > 10_000


def test_module_document_reads_docstrings_and_comments_without_importing(prepare, tmp_path):
    module = tmp_path / "sample_mod.py"
    module.write_text('"""Module doc."""\n# a comment\nraise SystemExit("imported!")\n'
                      'def f():\n    """Function doc."""\n    return 1  # trailing note\n')
    text = prepare.module_document(module)
    assert "Module doc." in text and "Function doc." in text
    assert "a comment" in text and "trailing note" in text and "imported" not in text


def test_tokenizer_specs_hold_the_official_settings(prepare):
    specs = {s["name"]: s for s in prepare.load_specs()}
    expected = {"sp_bpe_1024": ("sp1024", 1024), "sp_bpe_4096": ("sp4096", 4096), "sp_bpe_8192": ("sp8192", 8192)}
    for name, (suffix, vocab) in expected.items():
        spec = specs[name]
        assert (spec["dataset_suffix"], spec["vocab_size"]) == (suffix, vocab)
        assert spec["tokenizer_filename"] == f"fineweb_{vocab}_bpe.model"
        trainer = spec["trainer"]
        assert trainer["model_type"] == "bpe" and trainer["byte_fallback"] and trainer["split_digits"]
        assert trainer["normalization_rule_name"] == "nmt_nfkc" and trainer["add_dummy_prefix"] is False
        assert [trainer[k] for k in ("pad_id", "bos_id", "eos_id", "unk_id")] == [0, 1, 2, 3]


def run_cli(repo_root: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=repo_root, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=120)


def test_cli_help(repo_root, prepare, capsys):
    result = run_cli(repo_root, "data/prepare.py", "--help")
    assert result.returncode == 0 and "usage" in result.stdout
    for command in ("build", "download"):
        with pytest.raises(SystemExit) as exit_info:
            prepare.main([command, "--help"])
        assert exit_info.value.code == 0 and "usage" in capsys.readouterr().out


def test_download_offline_fails_at_once_naming_build(repo_root):
    result = run_cli(repo_root, "data/prepare.py", "download", "--variant", "sp1024", "--train-shards", "1",
                     env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode != 0
    assert "python data/prepare.py build" in result.stderr


def fake_hub(monkeypatch, remote: Path) -> list[str]:
    """Serve hf_hub_download from a local folder laid out like the official dataset repo."""
    import huggingface_hub
    requested = []

    def hf_hub_download(repo_id, repo_type, filename, subfolder):
        assert (repo_id, repo_type) == ("willdepueoai/parameter-golf", "dataset")
        requested.append(f"{subfolder}/{filename}")
        return str(remote / subfolder / filename)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    return requested


def make_fake_export(remote: Path) -> None:
    root = remote / "datasets"
    manifest = {"datasets": [{"name": "fineweb10B_sp1024", "stats": {"files_train": 3, "files_val": 1}}]}
    (root / "tokenizers").mkdir(parents=True)
    (root / "manifest.json").write_text(json.dumps(manifest))
    (root / "tokenizers" / "fineweb_1024_bpe.model").write_bytes(b"model")
    for name in ("fineweb_val_000000", "fineweb_train_000000", "fineweb_train_000001", "fineweb_train_000002"):
        train_gpt.write_shard(root / "datasets" / "fineweb10B_sp1024" / f"{name}.bin", np.arange(10))


def test_download_fetches_the_official_layout(prepare, tmp_path, monkeypatch):
    make_fake_export(tmp_path / "remote")
    requested = fake_hub(monkeypatch, tmp_path / "remote")
    monkeypatch.setattr(prepare, "hub_unreachable_reason", lambda: None)
    monkeypatch.setattr(prepare, "DATA_DIR", tmp_path / "data")
    prepare.main(["download", "--variant", "sp1024", "--train-shards", "2"])
    assert requested == ["datasets/manifest.json",
                         "datasets/datasets/fineweb10B_sp1024/fineweb_val_000000.bin",
                         "datasets/datasets/fineweb10B_sp1024/fineweb_train_000000.bin",
                         "datasets/datasets/fineweb10B_sp1024/fineweb_train_000001.bin",
                         "datasets/tokenizers/fineweb_1024_bpe.model"]
    local = tmp_path / "data" / "datasets" / "fineweb10B_sp1024"
    assert sorted(p.name for p in local.iterdir()) == [
        "fineweb_train_000000.bin", "fineweb_train_000001.bin", "fineweb_val_000000.bin", "manifest.json"]
    assert (tmp_path / "data" / "tokenizers" / "fineweb_1024_bpe.model").read_bytes() == b"model"
    manifest = json.loads((local / "manifest.json").read_text())  # what the trainer checks TOKENIZER_PATH against
    assert (manifest["vocab_size"], manifest["tokenizer_sha256"]) == (1024, hashlib.sha256(b"model").hexdigest())


def test_download_rejects_a_corrupt_shard(prepare, tmp_path, monkeypatch):
    make_fake_export(tmp_path / "remote")
    bad = tmp_path / "remote" / "datasets" / "datasets" / "fineweb10B_sp1024" / "fineweb_val_000000.bin"
    bad.write_bytes(bad.read_bytes()[:-2])
    fake_hub(monkeypatch, tmp_path / "remote")
    monkeypatch.setattr(prepare, "hub_unreachable_reason", lambda: None)
    monkeypatch.setattr(prepare, "DATA_DIR", tmp_path / "data")
    with pytest.raises(ShardError, match="fineweb_val_000000.bin"):
        prepare.main(["download", "--variant", "sp1024", "--train-shards", "1"])
    assert not (tmp_path / "data" / "datasets" / "fineweb10B_sp1024" / "fineweb_val_000000.bin").exists()


def test_download_sp8192_takes_the_tokenizer_the_manifest_names(prepare, tmp_path, monkeypatch):
    root = tmp_path / "remote" / "datasets"
    manifest = {"datasets": [{"name": "fineweb10B_sp8192", "tokenizer_name": "sp_bpe_8192",
                              "stats": {"files_train": 2, "files_val": 1}}],
                "tokenizers": [{"name": "sp_bpe_8192", "model_path": "tokenizers/v2/fineweb_8192_bpe.model"}]}
    (root / "tokenizers" / "v2").mkdir(parents=True)
    (root / "manifest.json").write_text(json.dumps(manifest))
    (root / "tokenizers" / "v2" / "fineweb_8192_bpe.model").write_bytes(b"model8192")
    for name in ("fineweb_val_000000", "fineweb_train_000000"):
        train_gpt.write_shard(root / "datasets" / "fineweb10B_sp8192" / f"{name}.bin", np.arange(8000, 8010))
    requested = fake_hub(monkeypatch, tmp_path / "remote")
    monkeypatch.setattr(prepare, "hub_unreachable_reason", lambda: None)
    monkeypatch.setattr(prepare, "DATA_DIR", tmp_path / "data")
    prepare.main(["download", "--variant", "sp8192", "--train-shards", "1"])
    assert requested[-1] == "datasets/tokenizers/v2/fineweb_8192_bpe.model"
    assert (tmp_path / "data" / "tokenizers" / "fineweb_8192_bpe.model").read_bytes() == b"model8192"
    assert (tmp_path / "data" / "datasets" / "fineweb10B_sp8192" / "fineweb_train_000000.bin").is_file()
