"""A small CPU run killed with SIGKILL mid-way and resumed, beside the same run straight through.

    python -m bench.resume_demo                 # about two minutes on 2 free cores
    python -m bench.resume_demo --kill-after 37 # SIGKILL once the log shows this step

Three runs of train_gpt.py with the same settings (a 2 x 128 ternary model, fp32, CPU, fixed seed, no wall-clock
cap, a checkpoint every 10 steps):
  1. `straight`: all ITERATIONS steps in one process;
  2. `killed`: RESUME_FROM=auto, sent SIGKILL as soon as its log shows step --kill-after;
  3. the very same command again: auto-resumes from the newest valid checkpoint in the run folder and finishes.
Then a table of train_loss per step of both and the weights checksum of both final checkpoints, written as
Markdown to bench/out/resume_demo.md (the copy in bench/resume_demo.md is one such run). This shows exactness,
not speed: the timings in the logs mean nothing on a shared machine.
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
OUT_DIR = REPO_ROOT / "bench" / "out"
DATA_DIR = OUT_DIR / "resume_demo_data"
LOG_DIR = OUT_DIR / "resume_demo_logs"
SETTINGS = dict(DATA_PATH=str(DATA_DIR), TOKENIZER_PATH=str(DATA_DIR / "tokenizer.model"), NUM_LAYERS="2",
                MODEL_DIM="128", NUM_HEADS="2", NUM_KV_HEADS="1", MLP_MULT="2", TRAIN_SEQ_LEN="128",
                TRAIN_BATCH_TOKENS="4096", ITERATIONS="60", WARMUP_STEPS="2", WARMDOWN_ITERS="20", LR_WARMUP_STEPS="5",
                MAX_WALLCLOCK_SECONDS="0", EMA_DECAY="0.95", EMA_START_FRAC="0.5", VAL_LOSS_EVERY="0",
                VAL_MAX_TOKENS="16384", TRAIN_LOG_EVERY="1", CHECKPOINT_EVERY="10", CHECKPOINT_KEEP="2",
                LOG_DIR=str(LOG_DIR), MODEL_COMPILE="0", SEED="1337")


def build_data() -> list[str]:
    command = [sys.executable, "data/prepare.py", "build", "--spec", "sp_bpe_1024", "--out",
               str(DATA_DIR.relative_to(REPO_ROOT)), "--val-docs", "20"]
    if not (DATA_DIR / "tokenizer.model").is_file():
        subprocess.run(command, cwd=REPO_ROOT, check=True)
    return command


def environment(run_id: str, **extra: str) -> dict[str, str]:
    return {**os.environ, **SETTINGS, "RUN_ID": run_id, "OMP_NUM_THREADS": "1", **extra}


def train(run_id: str, **extra: str) -> None:
    subprocess.run([sys.executable, "train_gpt.py"], cwd=REPO_ROOT, env=environment(run_id, **extra), check=True,
                   stdout=subprocess.DEVNULL)


def train_and_kill(run_id: str, kill_after: int) -> int:
    """Start the run and SIGKILL it once its log shows step `kill_after`; returns the last step it logged."""
    log = LOG_DIR / f"{run_id}.txt"
    process = subprocess.Popen([sys.executable, "train_gpt.py"], cwd=REPO_ROOT, stdout=subprocess.DEVNULL,
                               env=environment(run_id, RESUME_FROM="auto"))
    while process.poll() is None:
        if log.is_file() and re.search(rf"^step:{kill_after}/", log.read_text(), re.M):
            os.kill(process.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    if process.wait() != -signal.SIGKILL:
        raise SystemExit(f"the run ended (exit {process.returncode}) before step {kill_after}: nothing was killed")
    return max(int(s) for s in re.findall(r"^step:(\d+)/\d+ train_loss", log.read_text(), re.M))


def losses(log: str) -> list[tuple[int, str]]:
    return [(int(step), loss) for step, loss in re.findall(r"^step:(\d+)/\d+ train_loss:(\S+)", log, re.M)]


def report(kill_after: int, killed_at: int, data_command: list[str]) -> str:
    straight = (LOG_DIR / "straight.txt").read_text()
    interrupted = (LOG_DIR / "killed.txt").read_text()
    resume_line = re.search(r"^resume: from .*$", interrupted, re.M).group(0)
    resumed_from = int(re.search(r"step:(\d+)", resume_line).group(1))
    both = losses(interrupted)  # the killed run's lines (steps 1..killed_at), then the resumed run's
    first_run, second_run = both[:killed_at], both[killed_at:]
    straight_by_step = dict(losses(straight))
    rows = []
    for step, loss in straight_by_step.items():
        before = next((l for s, l in first_run if s == step), "")
        after = next((l for s, l in second_run if s == step), "")
        same = all(x == loss for x in (before, after) if x)
        rows.append(f"| {step} | {loss} | {before} | {after} | {'yes' if same else 'NO'} |")
    finals = {name: re.findall(r"^(checkpoint step:60 .*|final_prequant_exact .*)$", text, re.M)
              for name, text in (("straight", straight), ("killed + resumed", interrupted))}
    env_line = " ".join(f"{k}={v}" for k, v in SETTINGS.items() if k not in ("DATA_PATH", "TOKENIZER_PATH", "LOG_DIR"))
    weights = {name: re.search(r"weights_crc32:(\w+)", "\n".join(lines)).group(1) for name, lines in finals.items()}
    lines = [
        "# SIGKILL mid-run, resume, and the uninterrupted run beside it",
        "",
        "Made by `python -m bench.resume_demo` (CPU, fp32, 1 process, OMP_NUM_THREADS=1). Data:",
        f"`python {' '.join(data_command[1:])}` (the offline stdlib corpus).",
        "Settings of all three runs:",
        "",
        f"    {env_line}",
        "",
        "1. `straight`: `RUN_ID=straight python train_gpt.py` (60 steps in one process).",
        f"2. `killed`: `RUN_ID=killed RESUME_FROM=auto python train_gpt.py`, sent SIGKILL once its log showed step "
        f"{kill_after} (its last logged step: {killed_at}).",
        "3. the same command again: it appended to `killed.txt` and logged",
        f"   `{resume_line.replace(str(LOG_DIR), 'LOG_DIR')}`",
        "",
        f"The killed run had done {killed_at} steps; the checkpoint of step {resumed_from} was the newest, so steps "
        f"{resumed_from + 1}-{killed_at} ran twice, once before the kill and once after the resume.",
        "",
        "| step | straight | killed run (before SIGKILL) | resumed run | identical |",
        "| ---: | ---: | ---: | ---: | :---: |",
        *rows,
        "",
        "Final lines (the `checkpoint step:60` line carries a CRC32 of every weight tensor):",
        "",
        *[f"- {name}: `{line.replace(str(LOG_DIR), 'LOG_DIR')}`" for name, found in finals.items() for line in found],
        "",
        f"Weights after step 60: straight `{weights['straight']}`, killed + resumed `{weights['killed + resumed']}`"
        f" ({'identical' if len(set(weights.values())) == 1 else 'DIFFERENT'}).",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kill-after", type=int, default=37, help="SIGKILL once the log shows this step")
    options = parser.parse_args()
    data_command = build_data()
    for stale in ("straight", "killed"):
        (LOG_DIR / f"{stale}.txt").unlink(missing_ok=True)
        for path in (LOG_DIR / f"{stale}_checkpoints").glob("*"):
            path.unlink()
    train("straight")
    killed_at = train_and_kill("killed", options.kill_after)
    train("killed", RESUME_FROM="auto")
    text = report(options.kill_after, killed_at, data_command)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    (OUT_DIR / "resume_demo.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
