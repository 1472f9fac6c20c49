#!/usr/bin/env python3
"""Data tool: get token shards in the competition format.

    python data/prepare.py download --variant sp1024 --train-shards 10
        Fetch the official cached FineWeb shards and tokenizer from the Hugging Face hub.

    python data/prepare.py build --input docs.jsonl.gz --tokenizer MODEL --out DIR --val-docs 500
    python data/prepare.py build --spec sp_bpe_1024 --out DIR --val-docs 100
        Tokenize local text (or, with no --input, the offline standard-library corpus) into
        DIR/fineweb_{train,val}_NNNNNN.bin plus DIR/manifest.json, training a tokenizer
        from tokenizer_specs.json when --spec is given.

Input formats for build (each may end in .gz):
    *.jsonl  one JSON object per line; the document is its "text" field.
    *.txt    one document per file; several documents in one file are separated by a
             line that holds only a form feed (\\f).
Documents that are empty or only whitespace are skipped. The first --val-docs documents
(in input order) form the validation split; a trained tokenizer never sees them.
Each document is written as BOS (id 1) followed by its token ids, with no EOS, and the
token stream of each split is cut into shards of --shard-tokens tokens.
"""
from __future__ import annotations

import argparse
import ast
import gzip
import hashlib
import io
import json
import os
import shutil
import socket
import sys
import sysconfig
import tempfile
import threading
import time
import tokenize
from pathlib import Path
from typing import Callable, Iterable, Iterator

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from train_gpt import (SHARD_HEADER_INTS, SHARD_MAGIC, SHARD_VERSION, ShardError,  # noqa: E402
                       atomic_write_bytes, read_shard_header, sha256_file, write_shard)

SPECS_PATH = REPO_ROOT / "tokenizer_specs.json"
DATA_DIR = REPO_ROOT / "data"
BOS_ID = 1
EOS_ID = 2
MAX_UINT16_VOCAB = 1 << 16
DEFAULT_SHARD_TOKENS = 100_000_000
ENCODE_BATCH_DOCS = 256
DOC_SEPARATOR_LINE = "\f"
OFFICIAL_REPO_ID = "willdepueoai/parameter-golf"
OFFICIAL_REMOTE_ROOT = "datasets"
ONLINE_CHECK_SECONDS = 5.0


def fail(message: str) -> None:
    """Stop with a message on stderr and exit status 2."""
    print(f"prepare.py: error: {message}", file=sys.stderr)
    raise SystemExit(2)


# -----------------------------------------------------------------------------
# tokenizer_specs.json
# -----------------------------------------------------------------------------
def load_specs(path: Path = SPECS_PATH) -> list[dict]:
    return json.loads(path.read_text(encoding="utf-8"))["tokenizers"]


def get_spec(name: str) -> dict:
    specs = load_specs()
    for spec in specs:
        if spec["name"] == name:
            return spec
    fail(f"unknown tokenizer spec {name!r}; tokenizer_specs.json has {[s['name'] for s in specs]}")


def spec_for_variant(suffix: str) -> dict:
    for spec in load_specs():
        if spec["dataset_suffix"] == suffix:
            return spec
    fail(f"no tokenizer spec has dataset_suffix {suffix!r}")


# -----------------------------------------------------------------------------
# Reading documents from local files
# -----------------------------------------------------------------------------
def open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, "r", encoding="utf-8")


def input_kind(path: Path) -> str:
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    for kind in ("jsonl", "txt"):
        if name.endswith("." + kind):
            return kind
    fail(f"{path}: unsupported input; use .jsonl or .txt (optionally .gz)")


def iter_jsonl_docs(path: Path) -> Iterator[str]:
    with open_text(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                fail(f"{path}:{line_no}: not a JSON line ({error.msg} at column {error.colno}); fix or remove the line")
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                fail(f"{path}:{line_no}: expected a JSON object with a string field 'text'")
            yield record["text"]


def iter_txt_docs(path: Path) -> Iterator[str]:
    lines: list[str] = []
    with open_text(path) as f:
        for line in f:
            if line.rstrip("\r\n") == DOC_SEPARATOR_LINE:
                yield "".join(lines)
                lines = []
            else:
                lines.append(line)
    yield "".join(lines)


def iter_file_docs(paths: Iterable[Path]) -> Iterator[str]:
    for path in paths:
        reader = iter_jsonl_docs if input_kind(path) == "jsonl" else iter_txt_docs
        try:
            yield from reader(path)
        except (UnicodeDecodeError, OSError, EOFError) as error:
            fail(f"{path}: cannot be read as UTF-8 text{' (gzip)' if path.suffix == '.gz' else ''}: {error}")


# -----------------------------------------------------------------------------
# Offline default corpus: pydoc topics + docstrings and comments of the stdlib
# -----------------------------------------------------------------------------
SKIPPED_STDLIB_PARTS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__",
                        "encodings", "pydoc_data"}


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_source_files(root: Path) -> list[Path]:
    """Standard-library .py files, minus tests, third-party and generated tables."""
    files = []
    for path in root.rglob("*.py"):
        parts = path.relative_to(root).parts
        if SKIPPED_STDLIB_PARTS & set(parts) or parts[0].startswith(("config-", "_sysconfigdata")):
            continue
        files.append(path)
    return files


def docstrings_of(source: str) -> list[str]:
    """Module, class and function docstrings, parsed with ast (never imported)."""
    tree = ast.parse(source)
    nodes = [tree] + [n for n in ast.walk(tree)
                      if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    return [doc for doc in (ast.get_docstring(n) for n in nodes) if doc]


def comments_of(source: str) -> list[str]:
    """Comment texts (without '#'), in source order, read with tokenize."""
    found = []
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            text = tok.string.lstrip("#").strip()
            if text and not text.startswith("!"):
                found.append(text)
    return found


def module_document(path: Path) -> str:
    """One document per module: its docstrings, then its comments, one per line."""
    try:
        source = path.read_text(encoding="utf-8")
        parts = docstrings_of(source) + ["\n".join(comments_of(source))]
    except (SyntaxError, UnicodeDecodeError, tokenize.TokenError, ValueError):
        return ""
    return "\n\n".join(p for p in parts if p.strip())


def pydoc_topic_document(name: str) -> str:
    from pydoc_data.topics import topics
    return topics[name]


def offline_corpus_entries() -> list[tuple[str, Callable[[], str]]]:
    """(name, loader) pairs in a fixed order: sorted by sha256 of the name, which
    mixes pydoc topics and modules so that the first N documents are a fair sample."""
    from pydoc_data.topics import topics
    root = stdlib_root()
    entries = [(f"pydoc_topic:{key}", lambda key=key: pydoc_topic_document(key)) for key in topics]
    entries += [(f"stdlib:{p.relative_to(root).as_posix()}", lambda p=p: module_document(p))
                for p in stdlib_source_files(root)]
    return sorted(entries, key=lambda e: hashlib.sha256(e[0].encode()).hexdigest())


def iter_offline_docs() -> Iterator[str]:
    for _, load in offline_corpus_entries():
        yield load()


def offline_source_description() -> str:
    return f"offline stdlib corpus (pydoc_data topics + docstrings/comments of {stdlib_root()})"


# -----------------------------------------------------------------------------
# Document stream shared by tokenizer training and encoding
# -----------------------------------------------------------------------------
def document_stream(inputs: list[Path] | None, max_docs: int | None) -> Callable[[], Iterator[str]]:
    """A function returning a fresh iterator over the non-empty documents, capped at max_docs."""
    if inputs:
        for path in inputs:
            if not path.is_file():
                fail(f"input file {path} does not exist")
        raw = lambda: iter_file_docs(inputs)  # noqa: E731
    else:
        cached = list(tqdm(iter_offline_docs(), desc="offline corpus", unit="doc"))
        raw = lambda: iter(cached)  # noqa: E731

    def stream() -> Iterator[str]:
        count = 0
        for doc in raw():
            if max_docs is not None and count >= max_docs:
                return
            if doc.strip():
                count += 1
                yield doc
    return stream


# -----------------------------------------------------------------------------
# Tokenizer training (train documents only)
# -----------------------------------------------------------------------------
def trainer_sentences(docs: Iterable[str], max_bytes: int) -> Iterator[str]:
    """Lines of the documents, as SentencePiece sentences; over-long lines are cut."""
    for doc in docs:
        for line in doc.splitlines():
            line = line.strip()
            while line:
                piece = line.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")
                piece = piece or line[:1]
                yield piece
                line = line[len(piece):]


def train_tokenizer(train_docs: Iterable[str], spec: dict, out_dir: Path, vocab_size: int) -> Path:
    """Train a SentencePiece model in-process with the spec's settings; return its path."""
    import sentencepiece as spm
    settings = dict(spec["trainer"])
    spm.set_random_generator_seed(int(settings.pop("seed")))
    model = io.BytesIO()  # no model_prefix: the model file then holds no output path
    seen = []  # documents that reached the trainer
    counted = (seen.append(1) or doc for doc in train_docs)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=trainer_sentences(counted, int(settings["max_sentence_length"]) - 16),
            model_writer=model, vocab_size=vocab_size, minloglevel=2, **settings)
    except RuntimeError as error:
        if not seen:
            fail("no training documents to train the tokenizer on: the input is empty, or --val-docs takes every "
                 "document")
        fail(f"SentencePiece could not train a {vocab_size}-piece tokenizer on {len(seen)} documents "
             f"({str(error).strip().splitlines()[-1]}); give it more text or a smaller --vocab-size")
    path = out_dir / "tokenizer.model"
    path.write_bytes(model.getvalue())
    return path


def skip_first(docs: Iterator[str], n: int) -> Iterator[str]:
    for index, doc in enumerate(docs):
        if index >= n:
            yield doc


# -----------------------------------------------------------------------------
# Encoding documents into shards
# -----------------------------------------------------------------------------
class SplitWriter:
    """Accumulates one split's token stream and writes it as fixed-size shards."""

    def __init__(self, out_dir: Path, split: str, shard_tokens: int):
        self.out_dir, self.split, self.shard_tokens = out_dir, split, shard_tokens
        self.pending: list[np.ndarray] = []
        self.pending_tokens = 0
        self.files: list[str] = []
        self.docs = self.tokens = self.utf8_bytes = 0

    def add_document(self, tokens: np.ndarray, utf8_bytes: int) -> None:
        self.docs += 1
        self.tokens += tokens.size
        self.utf8_bytes += utf8_bytes
        self.pending.append(tokens)
        self.pending_tokens += tokens.size
        while self.pending_tokens >= self.shard_tokens:
            self._flush(self.shard_tokens)

    def close(self) -> None:
        if self.pending_tokens:
            self._flush(self.pending_tokens)

    def _flush(self, count: int) -> None:
        stream = np.concatenate(self.pending)
        name = f"fineweb_{self.split}_{len(self.files):06d}.bin"
        write_shard(self.out_dir / name, stream[:count])
        self.files.append(name)
        rest = stream[count:]
        self.pending = [rest] if rest.size else []
        self.pending_tokens = rest.size

    def summary(self) -> dict:
        return {"docs": self.docs, "tokens": self.tokens, "bos_tokens": self.docs,
                "utf8_bytes": self.utf8_bytes, "shards": self.files}


def batched(items: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def document_tokens(ids: list[int], vocab_size: int) -> np.ndarray:
    """BOS followed by the document's ids; every id must fit the vocab and uint16."""
    tokens = np.asarray([BOS_ID] + ids, dtype=np.int64)
    if int(tokens.max()) >= min(vocab_size, MAX_UINT16_VOCAB) or int(tokens.min()) < 0:
        raise ShardError(f"token id outside [0, {vocab_size}): range [{tokens.min()}, {tokens.max()}]")
    return tokens.astype(np.uint16)


def encode_documents(docs: Iterator[str], processor, val_docs: int, writers: dict[str, SplitWriter]) -> None:
    vocab_size = processor.get_piece_size()
    seen = 0
    progress = tqdm(desc="encode", unit="doc")
    for batch in batched(docs, ENCODE_BATCH_DOCS):
        for text, ids in zip(batch, processor.encode(batch, out_type=int, num_threads=2)):
            split = "val" if seen < val_docs else "train"
            writers[split].add_document(document_tokens(ids, vocab_size), len(text.encode("utf-8")))
            seen += 1
        progress.update(len(batch))
    progress.close()


def publish(staging: Path, out_dir: Path) -> None:
    """Move a finished build from its staging folder into out_dir, replacing the old data set: the old manifest
    goes first and the new one comes last, so a manifest never describes shards of another build."""
    (out_dir / "manifest.json").unlink(missing_ok=True)
    for pattern in ("fineweb_train_*.bin", "fineweb_val_*.bin"):
        for stale in out_dir.glob(pattern):
            stale.unlink()
    for path in sorted(staging.iterdir()):
        if path.name != "manifest.json":
            os.replace(path, out_dir / path.name)
    os.replace(staging / "manifest.json", out_dir / "manifest.json")


# -----------------------------------------------------------------------------
# build
# -----------------------------------------------------------------------------
def resolve_tokenizer(args, stream, out_dir: Path) -> tuple[Path, dict | None, float]:
    """The tokenizer to encode with: the given model, or one trained from the spec."""
    if args.tokenizer:
        path = Path(args.tokenizer).resolve()
        if not path.is_file():
            fail(f"tokenizer model {path} does not exist")
        return path, None, 0.0
    spec = get_spec(args.spec)
    vocab_size = args.vocab_size or int(spec["vocab_size"])
    print(f"training {spec['name']} tokenizer (vocab {vocab_size}) on the train documents", file=sys.stderr)
    start = time.perf_counter()
    path = train_tokenizer(skip_first(stream(), args.val_docs), spec, out_dir, vocab_size)
    return path.resolve(), spec, time.perf_counter() - start


def load_processor(path: Path):
    import sentencepiece as spm
    try:
        processor = spm.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError) as error:
        fail(f"{path} is not a SentencePiece model ({str(error).strip()[:200]})")
    if processor.get_piece_size() > MAX_UINT16_VOCAB:
        fail(f"tokenizer {path} has {processor.get_piece_size()} pieces; shards hold ids < {MAX_UINT16_VOCAB}")
    if processor.bos_id() != BOS_ID:
        fail(f"tokenizer {path} has bos_id {processor.bos_id()}; the competition format needs {BOS_ID}")
    return processor


def write_manifest(out_dir: Path, args, tokenizer_path: Path, tokenizer_file: Path, spec: dict | None, processor,
                   writers: dict[str, SplitWriter], seconds: dict) -> dict:
    """manifest.json in out_dir; tokenizer_path is where the tokenizer will live, tokenizer_file where it is now."""
    manifest = {
        "format": {"magic": SHARD_MAGIC, "version": SHARD_VERSION, "header_int32": SHARD_HEADER_INTS,
                   "token_dtype": "uint16-le",
                   "document": "BOS(1) + ids, no EOS"},
        "sources": [str(Path(p).resolve()) for p in args.input] if args.input else [offline_source_description()],
        "spec": spec["name"] if spec else None,
        "tokenizer_path": str(tokenizer_path),
        "tokenizer_sha256": sha256_file(tokenizer_file),
        "vocab_size": processor.get_piece_size(),
        "val_docs_requested": args.val_docs,
        "max_docs": args.max_docs,
        "shard_tokens": args.shard_tokens,
        "train": writers["train"].summary(),
        "val": writers["val"].summary(),
        "tokenizer_train_seconds": round(seconds["tokenizer"], 3),
        "build_seconds": round(seconds["total"], 3),
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def check_build_args(args) -> None:
    if args.val_docs < 1:
        fail("--val-docs must be at least 1 (the validation split is the first N documents)")
    if args.max_docs is not None and args.max_docs <= args.val_docs:
        fail("--max-docs must exceed --val-docs, or no training documents remain")
    if args.shard_tokens < 1:
        fail("--shard-tokens must be positive")
    if args.vocab_size and args.tokenizer:
        fail("--vocab-size applies only to a tokenizer trained with --spec")


def cmd_build(args) -> None:
    """Build into a staging folder inside --out and publish only a complete, checked build: a failure (bad input,
    too few documents, a full disk, Ctrl-C) leaves --out as it was."""
    check_build_args(args)
    start = time.perf_counter()
    out_dir = Path(args.out).resolve()
    if out_dir.exists() and not out_dir.is_dir():
        fail(f"--out {out_dir} is a file, not a folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".build-", dir=out_dir))
    try:
        manifest = build_in(staging, out_dir, args, start)
        publish(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print_build_summary(out_dir, manifest)


def build_in(staging: Path, out_dir: Path, args, start: float) -> dict:
    """Tokenizer (when trained), shards and manifest of one build, written into staging; returns the manifest."""
    stream = document_stream([Path(p) for p in args.input] if args.input else None, args.max_docs)
    tokenizer_file, spec, tokenizer_seconds = resolve_tokenizer(args, stream, staging)
    tokenizer_path = out_dir / tokenizer_file.name if spec else tokenizer_file
    processor = load_processor(tokenizer_file)
    writers = {split: SplitWriter(staging, split, args.shard_tokens) for split in ("val", "train")}
    encode_documents(stream(), processor, args.val_docs, writers)
    for writer in writers.values():
        writer.close()
    if writers["val"].docs < args.val_docs or writers["train"].docs == 0:
        fail(f"only {writers['val'].docs + writers['train'].docs} documents; need more than --val-docs "
             f"{args.val_docs} so that the train split is not empty ({out_dir} is left as it was)")
    seconds = {"tokenizer": tokenizer_seconds, "total": time.perf_counter() - start}
    return write_manifest(staging, args, tokenizer_path, tokenizer_file, spec, processor, writers, seconds)


def print_build_summary(out_dir: Path, manifest: dict) -> None:
    for split in ("train", "val"):
        s = manifest[split]
        body = s["tokens"] - s["bos_tokens"]
        print(f"{split}: {s['docs']} docs, {s['tokens']} tokens, {s['utf8_bytes']} UTF-8 bytes, "
              f"{s['utf8_bytes'] / max(body, 1):.3f} bytes/token (BOS excluded), {len(s['shards'])} shard(s)")
    print(f"tokenizer: {manifest['tokenizer_path']} (vocab {manifest['vocab_size']}, "
          f"trained in {manifest['tokenizer_train_seconds']:.1f}s)")
    print(f"wrote {out_dir} in {manifest['build_seconds']:.1f}s")


# -----------------------------------------------------------------------------
# download
# -----------------------------------------------------------------------------
def hub_host() -> tuple[str, int]:
    from urllib.parse import urlparse
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    return endpoint.hostname or "huggingface.co", endpoint.port or (443 if endpoint.scheme == "https" else 80)


def hub_unreachable_reason() -> str | None:
    """None when the hub answers a TCP connection within a few seconds, else why not."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    host, port = hub_host()
    outcome: list[OSError | None] = []
    # In a thread, so that a name lookup that hangs cannot hold the command up either.
    probe = threading.Thread(target=try_connect, args=(host, port, outcome), daemon=True)
    probe.start()
    probe.join(ONLINE_CHECK_SECONDS + 1)
    if not outcome:
        return f"no answer from {host}:{port} within {ONLINE_CHECK_SECONDS:.0f}s"
    return f"cannot reach {host}:{port} ({outcome[0]})" if outcome[0] else None


def try_connect(host: str, port: int, outcome: list) -> None:
    try:
        socket.create_connection((host, port), timeout=ONLINE_CHECK_SECONDS).close()
        outcome.append(None)
    except OSError as exc:
        outcome.append(exc)


def fetch(repo_id: str, remote_path: str, destination: Path) -> Path:
    """Download one file of the dataset repo (through the hub cache) to destination."""
    from huggingface_hub import hf_hub_download
    if destination.is_file():
        return destination
    remote = Path(remote_path)
    cached = Path(hf_hub_download(repo_id=repo_id, repo_type="dataset", filename=remote.name,
                                  subfolder=remote.parent.as_posix()))
    destination.parent.mkdir(parents=True, exist_ok=True)
    tmp = destination.with_name(destination.name + ".tmp")
    shutil.copyfile(cached.resolve(), tmp)
    os.replace(tmp, destination)
    return destination


def fetch_shard(repo_id: str, remote_path: str, destination: Path) -> None:
    """Download a shard and check its header; a bad copy is deleted so that a rerun fetches it again."""
    fetch(repo_id, remote_path, destination)
    try:
        read_shard_header(destination)
    except ShardError:
        destination.unlink()
        raise


def remote_dataset(args, suffix: str) -> tuple[int, str | None]:
    """(number of validation shards, the tokenizer model's path under the remote root or None), from the
    published manifest.json: a dataset entry names its tokenizer, whose entry gives the model's path."""
    manifest = json.loads(fetch(args.repo_id, f"{args.remote_root}/manifest.json",
                                DATA_DIR / "manifest.json").read_text(encoding="utf-8"))
    for entry in manifest.get("datasets", []):
        if entry.get("name") == f"fineweb10B_{suffix}":
            stats = entry.get("stats") or {}
            if args.train_shards > int(stats.get("files_train", args.train_shards)):
                fail(f"{suffix} has only {stats['files_train']} train shards on {args.repo_id}")
            tokenizers = {t.get("name"): t for t in manifest.get("tokenizers", [])}
            model_path = tokenizers.get(entry.get("tokenizer_name"), {}).get("model_path")
            return int(stats.get("files_val", 1)), model_path
    fail(f"dataset fineweb10B_{suffix} is not listed in {args.repo_id}:{args.remote_root}/manifest.json")


def cmd_download(args) -> None:
    reason = hub_unreachable_reason()
    if reason:
        fail(f"the Hugging Face hub is not reachable: {reason}.\n"
             "Offline, build shards from local text instead, e.g.\n"
             "  python data/prepare.py build --spec sp_bpe_1024 --out data/datasets/demo_stdlib --val-docs 60\n"
             "(see `python data/prepare.py build --help`).")
    spec = spec_for_variant(args.variant)
    dataset = f"fineweb10B_{args.variant}"
    out_dir = DATA_DIR / "datasets" / dataset
    remote_dir = f"{args.remote_root}/datasets/{dataset}"
    val_shards, model_path = remote_dataset(args, args.variant)
    names = [f"fineweb_val_{i:06d}.bin" for i in range(val_shards)]
    names += [f"fineweb_train_{i:06d}.bin" for i in range(args.train_shards)]
    for name in tqdm(names, desc=dataset, unit="shard"):
        fetch_shard(args.repo_id, f"{remote_dir}/{name}", out_dir / name)
    # Stored under the spec's name, which the configs and train_gpt.py's variant check expect.
    tokenizer = DATA_DIR / "tokenizers" / spec["tokenizer_filename"]
    fetch(args.repo_id, f"{args.remote_root}/{model_path or 'tokenizers/' + spec['tokenizer_filename']}", tokenizer)
    # the trainer checks a TOKENIZER_PATH against this record (a tokenizer of the same size would go unnoticed)
    manifest = {"sources": [f"{args.repo_id}:{remote_dir}"], "spec": spec["name"],
                "tokenizer_path": str(tokenizer.resolve()), "tokenizer_sha256": sha256_file(tokenizer),
                "vocab_size": spec["vocab_size"], "shards": names}
    atomic_write_bytes(out_dir / "manifest.json", (json.dumps(manifest, indent=2) + "\n").encode())
    print(f"{len(names)} shards in {out_dir} (headers checked); tokenizer {tokenizer}")


# -----------------------------------------------------------------------------
# Command line
# -----------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python data/prepare.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    dl = sub.add_parser("download", help="fetch official cached FineWeb shards + tokenizer from the HF hub")
    dl.add_argument("--variant", required=True, choices=[s["dataset_suffix"] for s in load_specs()])
    dl.add_argument("--train-shards", type=int, default=1, help="number of train shards (default 1)")
    dl.add_argument("--repo-id", default=OFFICIAL_REPO_ID, help=f"dataset repo (default {OFFICIAL_REPO_ID})")
    dl.add_argument("--remote-root", default=OFFICIAL_REMOTE_ROOT,
                    help=f"folder of the export inside the repo (default {OFFICIAL_REMOTE_ROOT})")
    dl.set_defaults(func=cmd_download)

    bd = sub.add_parser("build", help="tokenize local text (default: offline stdlib corpus) into shards")
    bd.add_argument("--input", nargs="+", metavar="FILE",
                    help=".jsonl/.txt files, optionally .gz (default: the offline stdlib corpus)")
    tok = bd.add_mutually_exclusive_group(required=True)
    tok.add_argument("--tokenizer", metavar="MODEL", help="existing SentencePiece .model to encode with")
    tok.add_argument("--spec", metavar="NAME", help="train DIR/tokenizer.model from this tokenizer_specs.json entry")
    bd.add_argument("--vocab-size", type=int, default=0, help="override the spec's vocab size (small tests)")
    bd.add_argument("--out", required=True, metavar="DIR", help="output folder for shards and manifest.json")
    bd.add_argument("--val-docs", type=int, required=True, help="the first N documents form the val split")
    bd.add_argument("--max-docs", type=int, default=None, help="use at most this many documents in all")
    bd.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS,
                    help=f"tokens per shard (default {DEFAULT_SHARD_TOKENS})")
    bd.set_defaults(func=cmd_build)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    try:
        main()
    except ShardError as error:
        fail(str(error))
