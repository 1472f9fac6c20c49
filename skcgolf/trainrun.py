"""Start train_gpt.py runs from env files: shared by scripts/sweep.py, bench/proxy.py and build_submission.py.

Env files (configs/*.env) are plain `NAME=value` lines, read with the same rules
as scripts/lib/env.sh: blank lines and `#` comments are skipped, values are
literal. Precedence, lowest first: env file < a caller's defaults (a sweep
manifest's "env") < process environment < a caller's overrides (a sweep's
config, the proxy's data paths).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
TRAINER = REPO_ROOT / "train_gpt.py"
ENV_LINE = re.compile(r"^([A-Z_][A-Z0-9_]*)=(.*)$")


def read_env_file(path: str | Path) -> dict[str, str]:
    """NAME -> value for every NAME=value line of an env file, in file order."""
    values: dict[str, str] = {}
    for lineno, raw in enumerate(Path(path).read_text().splitlines(), start=1):
        line = raw.rstrip("\r")
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = ENV_LINE.match(line)
        if not match:
            raise ValueError(f"{path}:{lineno} is not a NAME=value line: {line!r}")
        values[match.group(1)] = match.group(2)
    return values


def env_value(value) -> str:
    """An env-var string for a JSON manifest value (true/false become 1/0)."""
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


def run_env(env_file: str | Path | None, overrides: dict | None = None, defaults: dict | None = None) -> dict[str, str]:
    """The full environment of a run: env file, defaults, os.environ, overrides (later wins)."""
    env = read_env_file(env_file) if env_file else {}
    env.update({name: env_value(value) for name, value in (defaults or {}).items()})
    env.update(os.environ)
    env.update({name: env_value(value) for name, value in (overrides or {}).items()})
    return env


def dry_run(env: dict[str, str]) -> subprocess.CompletedProcess:
    """Let the trainer check a run's config and files (DRY_RUN=1); returns the finished process. A resumed sweep
    skips its finished runs instead of rerunning them, so their RUN_IDs are no conflict (RUN_OVERWRITE=1)."""
    return subprocess.run([sys.executable, str(TRAINER)], env={**env, "DRY_RUN": "1", "RUN_OVERWRITE": "1"},
                          cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def start_training(env: dict[str, str], log_path: Path) -> subprocess.Popen:
    """Start `python train_gpt.py` with stdout and stderr going to log_path."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        return subprocess.Popen([sys.executable, str(TRAINER)], env=env, cwd=REPO_ROOT,
                                stdout=log, stderr=subprocess.STDOUT)


def train(env: dict[str, str], log_path: Path) -> int:
    """Run train_gpt.py to the end; returns its exit code."""
    return start_training(env, log_path).wait()
