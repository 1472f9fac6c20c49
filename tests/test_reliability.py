"""Reliability (issue 15): bad input fails before step 1 with one `error:` line and exit status 2, nothing hangs,
no run is lost or overwritten, the log says why a run stopped, and no half-written file sits under a final name.
Each test asserts the exit status, the message, and what is (not) left on disk."""
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zlib
from contextlib import redirect_stderr
from pathlib import Path

import numpy as np
import pytest
import torch

import train_gpt
from tiny_lm import REPO_ROOT_FOR_TESTS, subprocess_env


def run_main(env: dict[str, str]) -> tuple[int, str]:
    """Run the trainer in this process and answer as its command line does: (exit status, stderr)."""
    stderr = io.StringIO()
    try:
        train_gpt.main(env)
        return 0, ""
    except BaseException as error:  # noqa: B036 (signals are part of what is tested)
        with redirect_stderr(stderr):
            status = train_gpt.exit_status(error)
        return status, stderr.getvalue()


def log_lines(env: dict[str, str]) -> list[str]:
    return (Path(env["LOG_DIR"]) / f"{env['RUN_ID']}.txt").read_text().splitlines()


def artifacts(env: dict[str, str]) -> list[str]:
    folder = Path(env.get("ARTIFACT_DIR") or env["LOG_DIR"])
    return sorted(p.name for p in folder.glob("*.skc")) if folder.is_dir() else []


def copy_data(tiny_data, folder: Path) -> Path:
    shutil.copytree(tiny_data.data_path, folder)
    return folder


def tiny_env(tiny_data, tmp_path: Path, **overrides) -> dict[str, str]:
    return tiny_data.env(**{"LOG_DIR": str(tmp_path / "logs"), "ITERATIONS": 2, "WARMUP_STEPS": 0, **overrides})


def trained_steps(lines: list[str]) -> list[str]:
    return [line for line in lines if re.match(r"step:\d+/\d+ train_loss", line)]


# --- 1. a hang: empty training shards ----------------------------------------------------------------------------

def test_empty_train_shards_fail_within_seconds(tiny_data, tmp_path):
    data = copy_data(tiny_data, tmp_path / "data")
    train_gpt.write_shard(data / "fineweb_train_000000.bin", np.zeros(0, dtype=np.uint16))
    train_gpt.write_shard(data / "fineweb_train_000001.bin", np.zeros(0, dtype=np.uint16))
    env = subprocess_env(tiny_env(tiny_data, tmp_path, DATA_PATH=str(data), RUN_ID="empty"))
    started = time.monotonic()
    result = subprocess.run([sys.executable, "train_gpt.py"], cwd=REPO_ROOT_FOR_TESTS, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: the train shards in DATA_PATH=") and "hold no tokens" in result.stderr
    assert time.monotonic() - started < 60
    assert log_lines(env)[-1].startswith("stop_reason:error phase:start-up step:0 ShardError")
    assert artifacts(env) == []
    with pytest.raises(train_gpt.ShardError, match="hold no tokens"):  # and the stream itself never spins
        train_gpt.TokenStream(train_gpt.shard_files(str(data), "train"), 512).take(10)


# --- 2. a silent wrong score: a tokenizer that does not match ----------------------------------------------------

def write_manifest(data: Path, **fields) -> None:
    (data / "manifest.json").write_text(json.dumps({"tokenizer_path": "/built/with/tokenizer.model", **fields}))


@pytest.mark.parametrize("manifest, message", [
    ({"vocab_size": 1024}, r"\(1024 tokens, says manifest.json\) but TOKENIZER_PATH=.* has 320"),
    ({"tokenizer_sha256": "0" * 64}, r"\(sha256 000000000000\.\.\., says manifest.json\) but TOKENIZER_PATH=.* is a "
                                     "different file"),
])
def test_a_tokenizer_the_manifest_does_not_name_is_refused(tiny_data, tmp_path, manifest, message):
    data = copy_data(tiny_data, tmp_path / "data")
    write_manifest(data, **manifest)
    env = tiny_env(tiny_data, tmp_path, DATA_PATH=str(data), RUN_ID="mismatch")
    status, stderr = run_main(env)
    assert status == 2 and re.search(message, stderr)
    assert trained_steps(log_lines(env)) == [] and artifacts(env) == []
    write_manifest(data, vocab_size=tiny_data.sp.vocab_size(), tokenizer_sha256=train_gpt.sha256_file(
        tiny_data.tokenizer_path))
    assert run_main({**env, "DRY_RUN": "1"})[0] == 0  # the right tokenizer passes


def write_tiny_artifact(path: Path, vocab_size: int, **settings) -> None:
    env = dict(NUM_LAYERS="2", MODEL_DIM="64", NUM_HEADS="2", NUM_KV_HEADS="1", MLP_MULT="2", TERNARY_GROUP_SIZE="32")
    args = train_gpt.Hyperparameters({**env, **settings, "VOCAB_SIZE": str(vocab_size)})
    torch.manual_seed(0)
    blob = train_gpt.export_model(train_gpt.GPT(args, vocab_size), args, train_gpt.Logger(None)).blob
    path.write_bytes(blob)


def test_an_artifact_is_scored_only_with_its_own_vocabulary_and_logs_its_own_settings(tiny_data, tmp_path):
    vocab = tiny_data.sp.vocab_size()
    write_tiny_artifact(tmp_path / "v4096.skc", 4096)
    env = tiny_env(tiny_data, tmp_path, EVAL_ARTIFACT=str(tmp_path / "v4096.skc"), RUN_ID="wrong_vocab")
    status, stderr = run_main(env)
    assert status == 2
    assert re.search(rf"was trained with a 4096-token vocabulary but TOKENIZER_PATH=.* has {vocab}", stderr)
    write_tiny_artifact(tmp_path / "mine.skc", vocab, MLP_MULT="3")
    env = tiny_env(tiny_data, tmp_path, EVAL_ARTIFACT=str(tmp_path / "mine.skc"), RUN_ID="own", NUM_LAYERS=4,
                   VAL_MAX_TOKENS=512)
    assert run_main(env)[0] == 0
    lines = log_lines(env)
    assert "config NUM_LAYERS=2" in lines and "config MLP_MULT=3.0" in lines  # the artifact's, not the env's 4 and 2
    assert any(line.startswith("model settings: from the artifact") for line in lines)


# --- 3. late failures: every input and output checked before step 1 ----------------------------------------------

@pytest.mark.parametrize("damage, message", [
    ("out_of_vocab", r"shard .*fineweb_train_000001\.bin holds token id 60000 >= the tokenizer's vocabulary of 320"),
    ("truncated", r"shard .*fineweb_train_000001\.bin header says 100 tokens .* the file is truncated or corrupt"),
    ("folder", r"shard .*fineweb_train_000001\.bin is not a file"),
])
def test_a_bad_late_shard_fails_before_step_1(tiny_data, tmp_path, damage, message):
    data = copy_data(tiny_data, tmp_path / "data")
    late = data / "fineweb_train_000001.bin"
    if damage == "folder":
        late.mkdir()
    else:
        train_gpt.write_shard(late, np.full(100, 60000 if damage == "out_of_vocab" else 5, dtype=np.uint16))
        if damage == "truncated":
            late.write_bytes(late.read_bytes()[:-10])
    env = tiny_env(tiny_data, tmp_path, DATA_PATH=str(data), RUN_ID="late")
    status, stderr = run_main(env)
    assert status == 2 and re.search(message, stderr), stderr
    assert trained_steps(log_lines(env)) == [] and artifacts(env) == []


def test_shard_check_logs_its_time(tiny_data, tmp_path):
    env = tiny_env(tiny_data, tmp_path, RUN_ID="checked", ITERATIONS=1, VAL_MAX_TOKENS=512)
    assert run_main(env)[0] == 0
    assert any(re.match(r"shard_check train_shards:1 train_tokens:\d+ val_shards:1 val_tokens:\d+ time:\d+ms", line)
               for line in log_lines(env))


@pytest.mark.parametrize("setting", ["ARTIFACT_DIR", "LOG_DIR"])
def test_an_output_folder_that_is_a_file_fails_before_step_1(tiny_data, tmp_path, setting):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder")
    env = tiny_env(tiny_data, tmp_path, RUN_ID="unwritable", **{setting: str(blocker / "sub")})
    status, stderr = run_main(env)
    assert status == 2 and re.search(rf"{setting}=.*blocker/sub cannot be a folder: .*blocker is a file", stderr)
    assert not (tmp_path / "logs" / "unwritable.txt").exists() or trained_steps(log_lines(env)) == []
    assert blocker.read_text() == "a file, not a folder"


# --- 4. non-atomic writes ----------------------------------------------------------------------------------------

def test_a_failed_artifact_write_leaves_nothing_under_the_final_name(tiny_data, tmp_path, monkeypatch):
    def disk_full(fd):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(train_gpt.os, "fsync", disk_full)
    env = tiny_env(tiny_data, tmp_path, RUN_ID="diskfull", VAL_MAX_TOKENS=512)
    status, stderr = run_main(env)
    assert status == 2 and "cannot write the artifact" in stderr and "No space left on device" in stderr
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == ["diskfull.txt"]  # no artifact, no temp file
    assert log_lines(env)[-1].startswith("stop_reason:error phase:export")


def test_atomic_write_keeps_the_previous_file_when_interrupted(tmp_path, monkeypatch):
    target = tmp_path / "model.skc"
    train_gpt.atomic_write_bytes(target, b"complete old artifact")
    def killed_before_rename(src, dst):
        raise OSError("killed between the write and the rename")
    monkeypatch.setattr(train_gpt.os, "replace", killed_before_rename)
    with pytest.raises(OSError, match="killed"):
        train_gpt.atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"complete old artifact" and os.listdir(tmp_path) == ["model.skc"]


def dataset_snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("bad_input, val_docs, message", [
    ("not_json", 5, r"docs\.jsonl:7: not a JSON line"),
    ("good", 40, r"only 30 documents; need more than --val-docs 40"),
    ("good", 30, r"only 30 documents; need more than --val-docs 30"),
])
def test_a_failed_rebuild_leaves_the_old_dataset_intact(prepare, tiny_data, tmp_path, capsys, bad_input, val_docs,
                                                        message):
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": text}) + "\n" for text in tiny_data.train_docs[:30]))
    out = tmp_path / "out"
    prepare.main(["build", "--input", str(docs), "--tokenizer", tiny_data.tokenizer_path, "--out", str(out),
                  "--val-docs", "5"])
    before = dataset_snapshot(out)
    if bad_input == "not_json":
        lines = docs.read_text().splitlines(keepends=True)
        docs.write_text("".join(lines[:6]) + "{not json\n" + "".join(lines[6:]))
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        prepare.main(["build", "--input", str(docs), "--tokenizer", tiny_data.tokenizer_path, "--out", str(out),
                      "--val-docs", str(val_docs)])
    assert stop.value.code == 2 and re.search(message, capsys.readouterr().err)
    assert dataset_snapshot(out) == before  # same files, same bytes, no staging folder left


def test_spec_build_on_empty_input_says_there_is_nothing_to_train_on(prepare, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(SystemExit) as stop:
        prepare.main(["build", "--input", str(empty), "--spec", "sp_bpe_1024", "--vocab-size", "320",
                      "--out", str(tmp_path / "out"), "--val-docs", "1"])
    assert stop.value.code == 2 and "no training documents to train the tokenizer on" in capsys.readouterr().err
    assert list((tmp_path / "out").iterdir()) == []


# --- 5. runs that overwrite each other ---------------------------------------------------------------------------

def test_a_finished_run_id_is_not_reused_unless_told(tiny_data, tmp_path):
    env = tiny_env(tiny_data, tmp_path, RUN_ID="once", VAL_MAX_TOKENS=512)
    assert run_main(env)[0] == 0
    first_log = log_lines(env)
    assert first_log[-1] == "stop_reason:completed steps:2" and artifacts(env) == ["once_model.skc"]
    status, stderr = run_main(env)
    assert status == 2 and "RUN_ID=once names a finished run" in stderr and "RUN_OVERWRITE=1" in stderr
    assert log_lines(env) == first_log and artifacts(env) == ["once_model.skc"]
    assert run_main({**env, "RUN_OVERWRITE": "1", "ITERATIONS": "1"})[0] == 0
    assert log_lines(env)[-1] == "stop_reason:completed steps:1" and artifacts(env) == ["once_model.skc"]
    evaluate_own = {**env, "RUN_OVERWRITE": "1", "EVAL_ARTIFACT": str(tmp_path / "logs" / "once_model.skc")}
    assert run_main(evaluate_own)[0] == 0 and artifacts(env) == ["once_model.skc"]  # never deletes what it reads
    with pytest.raises(train_gpt.ConfigError, match="RUN_OVERWRITE"):
        train_gpt.Hyperparameters({"RUN_OVERWRITE": "maybe"})


def test_an_over_cap_submission_artifact_is_named_as_such(tiny_data, tmp_path):
    env = tiny_env(tiny_data, tmp_path, RUN_ID="fat", SUBMISSION_MODE=1, SIZE_CAP_BYTES=1000, VAL_MAX_TOKENS=512)
    status, stderr = run_main(env)
    assert status == 2 and "leaves" in stderr and "under the 1000-byte cap" in stderr
    assert artifacts(env) == ["fat_model.over_cap.skc"]
    assert log_lines(env)[-1].startswith("stop_reason:error phase:export step:2 ArtifactError")


# --- 6. the reason a run stopped is the log's last line ----------------------------------------------------------

def interrupt_at_call(monkeypatch, call: int, interrupt) -> None:
    real, calls = train_gpt.train_step, []

    def step(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            interrupt()
        return real(*args, **kwargs)
    monkeypatch.setattr(train_gpt, "train_step", step)


def test_sigterm_stops_at_the_next_step_boundary_and_says_so(tiny_data, tmp_path, monkeypatch):
    interrupt_at_call(monkeypatch, 3, lambda: os.kill(os.getpid(), signal.SIGTERM))
    env = tiny_env(tiny_data, tmp_path, RUN_ID="term", ITERATIONS=50)
    status, stderr = run_main(env)
    # the signal lands in step 3; that step's vote is read (without a host sync) after step 4, on every rank
    assert status == 128 + signal.SIGTERM and stderr == "stopped: SIGTERM: every rank stopped after step 4\n"
    lines = log_lines(env)
    assert lines[-1] == "stop_reason:sigterm phase:training step:4 RunStopped: SIGTERM: every rank stopped after step 4"
    assert len(trained_steps(lines)) == 3 and artifacts(env) == []
    assert signal.getsignal(signal.SIGTERM) is not None  # the previous handler is back


def test_sigint_and_a_non_finite_loss_are_the_last_log_line(tiny_data, tmp_path, monkeypatch):
    def sigint():
        raise KeyboardInterrupt
    interrupt_at_call(monkeypatch, 2, sigint)
    env = tiny_env(tiny_data, tmp_path, RUN_ID="int", ITERATIONS=50)
    assert run_main(env) == (128 + signal.SIGINT, "stopped: SIGINT\n")
    assert log_lines(env)[-1] == "stop_reason:sigint phase:training step:1 KeyboardInterrupt: interrupted"
    monkeypatch.setattr(train_gpt, "training_loss", lambda logits, targets, z: (logits.sum() * np.nan,) * 2)
    env = tiny_env(tiny_data, tmp_path, RUN_ID="nan")
    status, stderr = run_main(env)
    assert status == 1 and stderr.startswith("error: non-finite training loss at step 1")
    assert log_lines(env)[-1].startswith("stop_reason:non_finite_loss phase:training step:2 FloatingPointError: "
                                         "non-finite training loss at step 1")


# --- 7. `error:` lines, never tracebacks -------------------------------------------------------------------------

def forged(blob: bytes, edit) -> bytes:
    """The artifact with its JSON header edited by `edit`, re-framed with a valid checksum (a deliberate forgery)."""
    payload = train_gpt.unframe_artifact(blob, "x")
    size = int.from_bytes(payload[:4], "little")
    header = json.loads(payload[4:4 + size])
    edit(header)
    text = json.dumps(header).encode()
    return train_gpt.frame_artifact(len(text).to_bytes(4, "little") + text + payload[4 + size:], "zlib")


def reframed(body: bytes, codec_index: int) -> bytes:
    head = train_gpt.ARTIFACT_MAGIC + bytes((train_gpt.ARTIFACT_VERSION, codec_index)) + len(body).to_bytes(4, "little")
    return head + zlib.crc32(head + body).to_bytes(4, "little") + body


@pytest.mark.parametrize("make, message", [
    (lambda b: b[:5] + bytes((b[5] ^ 1,)) + b[6:], "is corrupt: checksum mismatch over its header and payload"),
    (lambda b: b + b"\0\0\0", "has 3 bytes after its"),
    (lambda b: b[:-3], "is truncated"),
    (lambda b: reframed(os.urandom(500), 1), "its lzma payload does not decode"),
    (lambda b: reframed(zlib.compress(bytes(300_000_000)), 2), "decompresses to more than"),
    (lambda b: forged(b, lambda h: h["config"].pop("MODEL_DIM")), "config lacks MODEL_DIM"),
    (lambda b: forged(b, lambda h: h["config"].update(NUM_LAYERS=-3)), "NUM_LAYERS=.* must be >= 1"),
    (lambda b: forged(b, lambda h: h["config"].update(NUM_LAYERS=4000, MODEL_DIM=4096)), "NUM_LAYERS=.* must be <= 256"),
    (lambda b: forged(b, lambda h: h["config"].update(NUM_LAYERS=200, MODEL_DIM=16384, NUM_HEADS=128, NUM_KV_HEADS=128)),
     "tensors do not match the model its config describes"),
    (lambda b: forged(b, lambda h: h["tensors"][0].update(shape=[10**12, 10**12])),
     "tensors do not match the model its config describes"),
    (lambda b: forged(b, lambda h: h["tensors"][0]["fields"]["values"].__setitem__(3, [10**9, 10**9])),
     "claims .* bytes at offset"),
])
def test_a_damaged_or_forged_artifact_is_refused_before_anything_is_allocated(tmp_path, make, message):
    write_tiny_artifact(tmp_path / "a.skc", 96, EXPORT_CODEC="lzma")
    blob = (tmp_path / "a.skc").read_bytes()
    args = train_gpt.Hyperparameters({})
    with pytest.raises(train_gpt.ArtifactError, match=message):
        train_gpt.load_artifact(make(blob), "a.skc", args)


@pytest.mark.parametrize("case, message", [
    ("not_a_tokenizer", "is not a SentencePiece model"),
    ("empty_tokenizer", "is not a SentencePiece model"),
    ("seed", r"SEED='4294967296' must be <= 4294967295"),
    ("log_dir_is_file", r"LOG_DIR=.* cannot be a folder"),
    ("bracket_data_path", None),
])
def test_bad_input_gives_one_error_line_and_status_2(tiny_data, tmp_path, case, message):
    env = tiny_env(tiny_data, tmp_path, RUN_ID="bad", DRY_RUN=1)
    if case in ("not_a_tokenizer", "empty_tokenizer"):
        (tmp_path / "tok.model").write_bytes(b"" if case == "empty_tokenizer" else b"no protobuf here" * 10)
        env["TOKENIZER_PATH"] = str(tmp_path / "tok.model")
    elif case == "seed":
        env["SEED"] = "4294967296"
    elif case == "log_dir_is_file":
        (tmp_path / "file").write_text("x")
        env["LOG_DIR"] = str(tmp_path / "file")
    else:
        env["DATA_PATH"] = str(copy_data(tiny_data, tmp_path / "data[1]"))
    result = subprocess.run([sys.executable, "train_gpt.py"], cwd=REPO_ROOT_FOR_TESTS, env=subprocess_env(env),
                            capture_output=True, text=True, timeout=120)
    if message is None:  # `[` in DATA_PATH is a character, not a glob
        assert result.returncode == 0, result.stderr
        return
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert re.fullmatch(rf"error: .*{message}.*\n", result.stderr, re.S), result.stderr


# --- 8. a frozen rank fails the job within the step timeout ------------------------------------------------------

def worker_pids(parent: int) -> dict[int, int]:
    """rank -> pid of the processes torchrun started."""
    ranks = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) != parent:
                    continue
                environ = dict(item.split("=", 1) for item in (entry / "environ").read_text().split("\0") if "=" in item)
            except (OSError, IndexError, ValueError):
                continue
            if "RANK" in environ:
                ranks[int(environ["RANK"])] = int(entry.name)
    return ranks


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the worker processes through /proc")
def test_a_frozen_rank_times_out_within_the_step_timeout(tiny_data, tmp_path):
    env = subprocess_env(tiny_env(tiny_data, tmp_path, RUN_ID="frozen", ITERATIONS=100000, DIST_STEP_TIMEOUT_SECONDS=4,
                                  TRAIN_LOG_EVERY=1))
    launcher = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                 "train_gpt.py"], cwd=REPO_ROOT_FOR_TESTS, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
    log = tmp_path / "logs" / "frozen.txt"
    try:
        deadline = time.monotonic() + 240
        while not (log.exists() and "step:3/" in log.read_text()):
            assert time.monotonic() < deadline and launcher.poll() is None, "training did not start"
            time.sleep(0.2)
        workers = worker_pids(launcher.pid)
        os.kill(workers[1], signal.SIGSTOP)
        frozen_at = time.monotonic()
        while not log.read_text().splitlines()[-1].startswith("stop_reason:"):
            assert time.monotonic() - frozen_at < 60, "rank 0 still waits for the frozen rank"
            time.sleep(0.2)
        assert time.monotonic() - frozen_at < 4 + 30
        last = log.read_text().splitlines()[-1]
        assert re.match(r"stop_reason:error phase:training step:\d+ (RuntimeError|DistBackendError): .*timed out", last, re.I), last
    finally:
        for pid in worker_pids(launcher.pid).values():
            os.kill(pid, signal.SIGKILL)
        launcher.wait(timeout=120)
    assert launcher.returncode != 0 and artifacts({"LOG_DIR": str(tmp_path / "logs")}) == []


# --- 9. typos and dry runs ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, meant", [("ITERATONS", "ITERATIONS"), ("SEEED", "SEED"), ("iterations", "ITERATIONS"),
                                         ("MAX_WALLCLOCK_SECOND", "MAX_WALLCLOCK_SECONDS"), ("seed", "SEED"),
                                         ("Train_Seq_Len", "TRAIN_SEQ_LEN"), ("MODELDIM", "MODEL_DIM"),
                                         ("RUN_OVERWRIET", "RUN_OVERWRITE")])
def test_misspelt_settings_are_errors_with_did_you_mean(name, meant):
    with pytest.raises(train_gpt.ConfigError, match=rf"unknown setting {name}.*did you mean {meant}\?"):
        train_gpt.Hyperparameters({name: "1"})


SYSTEM_VARIABLES = ("PATH HOME USER SHELL PWD OLDPWD TERM LANG LANGUAGE TZ TMPDIR HOSTNAME LOGNAME MAIL EDITOR PAGER "
                    "DISPLAY SHLVL COLUMNS LINES HISTSIZE HISTFILE RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE "
                    "GROUP_RANK ROLE_RANK MASTER_ADDR MASTER_PORT CUDA_VISIBLE_DEVICES CUDA_HOME OMP_NUM_THREADS "
                    "MKL_NUM_THREADS PYTHONPATH PYTHONHASHSEED PYTHONUNBUFFERED VIRTUAL_ENV CONDA_PREFIX HF_HOME "
                    "NCCL_DEBUG TORCH_NCCL_ASYNC_ERROR_HANDLING TORCHELASTIC_RUN_ID LD_LIBRARY_PATH CI GITHUB_ACTIONS "
                    "RUNNER_OS HTTP_PROXY HTTPS_PROXY NO_PROXY http_proxy no_proxy SSH_AUTH_SOCK XDG_RUNTIME_DIR "
                    "DBUS_SESSION_BUS_ADDRESS KUBERNETES_SERVICE_HOST SLURM_JOB_ID NPROC_PER_NODE TORCHRUN PYTHON "
                    "OMP_PROC_BIND JOB_ID NODE_RANK NNODES GPUS_PER_NODE SEEDS_DIR").split()


def test_an_ordinary_environment_is_not_taken_for_typos():
    ours = set(train_gpt.Hyperparameters.SETTINGS)
    train_gpt.Hyperparameters({name: "1" for name in SYSTEM_VARIABLES})
    train_gpt.Hyperparameters({name: value for name, value in os.environ.items() if name not in ours})


def test_dry_run_fails_for_what_the_run_would_reject_at_start(tiny_data, tmp_path):
    env = tiny_env(tiny_data, tmp_path, RUN_ID="dry", DRY_RUN=1)
    assert run_main(env)[0] == 0 and not (tmp_path / "logs").exists()  # checks without writing anything
    missing_data = run_main({**env, "DATA_PATH": str(tmp_path / "nowhere")})
    assert missing_data[0] == 2 and "no train shards fineweb_train_*.bin in DATA_PATH=" in missing_data[1]
    missing_tokenizer = run_main({**env, "TOKENIZER_PATH": str(tmp_path / "none.model")})
    assert missing_tokenizer[0] == 2 and "none.model not found" in missing_tokenizer[1]
    split = run_main({**env, "WORLD_SIZE": "3"})
    assert split[0] == 2 and "TRAIN_BATCH_TOKENS=1024 must be a positive multiple of WORLD_SIZE*TRAIN_SEQ_LEN=96" in split[1]
    assert run_main({**env, "DRY_RUN": "config", "DATA_PATH": str(tmp_path / "nowhere")})[0] == 0  # config only
