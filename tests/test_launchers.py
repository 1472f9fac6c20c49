"""Env files, the shell env loader, and every launcher and config through the trainer's DRY_RUN validation.

The dry-run tests need train_gpt.py's Hyperparameters (issue 3) and skip until it exists.
All dry runs start at once (module fixture) so that the torch imports overlap.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
from scripts import sweep
from skcgolf import runlog, trainrun

ENV_FILES = sorted((REPO_ROOT / "configs").glob("*.env"))
LAUNCHERS = sorted(REPO_ROOT.glob("run_*.sh"))
SMOKE_MANIFEST = REPO_ROOT / "configs" / "sweeps" / "cpu_smoke_manifest.json"
COMPETITION_MANIFEST = REPO_ROOT / "configs" / "sweeps" / "competition_ablation_manifest.json"
LAUNCHER_NUM_LAYERS = "6"  # set in the environment: must win over the env files

needs_trainer_config = pytest.mark.skipif(
    "class Hyperparameters" not in (REPO_ROOT / "train_gpt.py").read_text(),
    reason="train_gpt.py has no Hyperparameters yet (issue 3): nothing to validate the configs against")


def bash_load(env_file: Path, preset: dict | None = None) -> subprocess.CompletedProcess:
    """Source scripts/lib/env.sh in a clean bash, load env_file, print the environment NUL-separated."""
    script = f'source scripts/lib/env.sh && load_env_file "{env_file}" && env -0'
    return subprocess.run(["bash", "-c", script], cwd=REPO_ROOT, capture_output=True, text=True,
                          env={"PATH": os.environ["PATH"], **(preset or {})})


def env_of(result: subprocess.CompletedProcess) -> dict:
    return dict(item.split("=", 1) for item in result.stdout.split("\0") if item)


# ----------------------------------------------------------------------------- env files (no trainer needed)

def test_there_are_env_files_and_launchers():
    names = {path.name for path in ENV_FILES}
    assert {"skc_competition.env", "baseline.env", "cpu_proxy.env", "baseline_cpu_proxy.env"} <= names
    assert {"run_skc_competition_8xh100.sh", "run_skc_proxy_2xgpu.sh"} <= {path.name for path in LAUNCHERS}


@pytest.mark.parametrize("env_file", ENV_FILES, ids=lambda path: path.name)
def test_shell_and_python_read_env_files_alike(env_file):
    values = trainrun.read_env_file(env_file)
    assert values, f"{env_file} sets nothing"
    result = bash_load(env_file)
    assert result.returncode == 0, result.stderr
    loaded = env_of(result)
    assert {name: loaded.get(name) for name in values} == values


def test_environment_wins_over_env_file():
    result = bash_load(REPO_ROOT / "configs" / "cpu_proxy.env", {"NUM_LAYERS": "3", "MODEL_DIM": ""})
    loaded = env_of(result)
    assert loaded["NUM_LAYERS"] == "3" and loaded["MODEL_DIM"] == ""  # set-but-empty also wins
    assert loaded["MLP_MULT"] == "3"


def test_malformed_env_line_is_an_error(tmp_path):
    bad = tmp_path / "bad.env"
    bad.write_text("NUM_LAYERS=4\nnum layers = 4\n")
    result = bash_load(bad)
    assert result.returncode != 0 and "bad.env:2" in result.stderr
    with pytest.raises(ValueError, match="bad.env:2"):
        trainrun.read_env_file(bad)


def test_competition_config_spells_out_the_baseline_names():
    competition = trainrun.read_env_file(REPO_ROOT / "configs" / "skc_competition.env")
    for name in trainrun.read_env_file(REPO_ROOT / "configs" / "baseline.env"):
        assert name in competition, f"baseline.env sets {name}, which skc_competition.env does not spell out"


def test_launcher_refuses_unknown_arguments():
    result = subprocess.run(["bash", str(LAUNCHERS[0]), "--bogus"], capture_output=True, text=True)
    assert result.returncode == 2 and "unknown argument --bogus" in result.stderr


def fake_data(tmp_path: Path) -> dict:
    """DATA_PATH/TOKENIZER_PATH that pass the launcher's existence check (the contents are never read here)."""
    for name in ("fineweb_train_000000.bin", "fineweb_val_000000.bin", "tok.model"):
        (tmp_path / name).touch()
    return {"DATA_PATH": str(tmp_path), "TOKENIZER_PATH": str(tmp_path / "tok.model")}


def test_launcher_stops_without_data_and_says_how_to_get_it(tmp_path):
    env = {**os.environ, "DATA_PATH": str(tmp_path / "fineweb10B_sp1024"), "TOKENIZER_PATH": str(tmp_path / "none.model")}
    result = subprocess.run(["bash", str(REPO_ROOT / "run_skc_competition_8xh100.sh")], env=env,
                            capture_output=True, text=True)
    assert result.returncode == 1
    assert "missing train shards" in result.stderr and "missing tokenizer" in result.stderr
    assert "python data/prepare.py download --variant sp1024 --train-shards 80" in result.stderr
    plain = subprocess.run(["bash", str(REPO_ROOT / "run_skc_competition_8xh100.sh")], capture_output=True, text=True,
                           env={k: v for k, v in os.environ.items() if k not in ("DATA_PATH", "TOKENIZER_PATH")})
    assert "python data/prepare.py download --variant sp8192 --train-shards 80" in plain.stderr


def test_launcher_hands_torchrun_the_settings(tmp_path):
    fake_torchrun = tmp_path / "torchrun"
    fake_torchrun.write_text('#!/bin/sh\necho "args: $*"\necho "omp=$OMP_NUM_THREADS nccl=$TORCH_NCCL_ASYNC_ERROR_HANDLING '
                             'layers=$NUM_LAYERS seed=$SEED run_id=$RUN_ID"\n')
    fake_torchrun.chmod(0o755)
    env = {**os.environ, **fake_data(tmp_path), "TORCHRUN": str(fake_torchrun), "NPROC_PER_NODE": "4",
           "SEED": "42", "LOG_DIR": str(tmp_path / "logs"), "DRY_RUN": "0"}
    result = subprocess.run(["bash", str(REPO_ROOT / "run_skc_proxy_2xgpu.sh")], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "args: --standalone --nproc_per_node=4 train_gpt.py" in result.stdout
    assert "nccl=1 layers=8 seed=42 run_id=skc_proxy_2xgpu_" in result.stdout  # the overlay's NUM_LAYERS
    (console_log,) = (tmp_path / "logs").glob("skc_proxy_2xgpu_*_seed42.console.log")
    assert "args: " in console_log.read_text()


def test_launcher_runs_the_script_it_is_given(tmp_path):
    fake_torchrun = tmp_path / "torchrun"
    fake_torchrun.write_text('#!/bin/sh\necho "args: $*"\n')
    fake_torchrun.chmod(0o755)
    script = tmp_path / "extracted" / "train_gpt.py"
    script.parent.mkdir()
    script.touch()
    env = {**os.environ, **fake_data(tmp_path), "TORCHRUN": str(fake_torchrun), "LOG_DIR": str(tmp_path / "logs"),
           "DRY_RUN": "0"}
    launcher = str(REPO_ROOT / "run_skc_competition_8xh100.sh")
    result = subprocess.run(["bash", launcher, "--script", str(script)], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert f"--nproc_per_node=8 {script}" in result.stdout and f"script={script}" in result.stdout
    missing = subprocess.run(["bash", launcher, "--script", str(tmp_path / "none.py")], env=env, capture_output=True,
                             text=True)
    assert missing.returncode == 2 and "--script needs an existing file" in missing.stderr


# ----------------------------------------------------------------------------- dry runs against the trainer

RUN_IDENTITY = {"RUN_ID", "DRY_RUN"}  # set per run by launchers and sweeps, not by a config


def dry_run_jobs() -> dict:
    """name -> (command, env) for every env file, launcher and smoke-sweep config."""
    base = {**os.environ, "DRY_RUN": "config", "PYTHON": sys.executable}  # the data of these configs is not here
    trainer = [sys.executable, "train_gpt.py"]
    jobs = {f"env:{path.name}": (trainer, {**base, **trainrun.read_env_file(path)}) for path in ENV_FILES}
    for path in LAUNCHERS:
        jobs[f"launcher:{path.name}"] = (["bash", str(path), "--dry-run"], {**base, "NUM_LAYERS": LAUNCHER_NUM_LAYERS})
    manifest = sweep.load_manifest(SMOKE_MANIFEST)
    runs = sweep.plan_runs(manifest, REPO_ROOT / "logs" / "test_dry_run")
    # Seeds do not change validity, and the reference adds nothing to what the other configs check.
    for run in [run for run in runs if run.seed == manifest.seeds[0] and run.config.overrides]:
        jobs[f"sweep:{run.config.name}"] = (trainer, {**run.env, "DRY_RUN": "config"})
    return jobs


JOBS = dry_run_jobs()


@pytest.fixture(scope="module")
def dry_runs() -> dict:
    """name -> (returncode, output) for every dry-run job, all run concurrently."""
    processes = {name: subprocess.Popen(command, cwd=REPO_ROOT, env=env, text=True,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
                 for name, (command, env) in JOBS.items()}
    return {name: (process.wait(timeout=600), process.stdout.read()) for name, process in processes.items()}


@needs_trainer_config
@pytest.mark.parametrize("name", sorted(JOBS))
def test_config_passes_trainer_validation(dry_runs, name):
    returncode, output = dry_runs[name]
    assert returncode == 0, f"{name} failed DRY_RUN validation:\n{output[-3000:]}"


@needs_trainer_config
@pytest.mark.parametrize("launcher", LAUNCHERS, ids=lambda path: path.name)
def test_launcher_passes_environment_through(dry_runs, launcher):
    _, output = dry_runs[f"launcher:{launcher.name}"]
    assert "launch: run_id=" in output
    assert runlog.parse_config(output).get("NUM_LAYERS") == LAUNCHER_NUM_LAYERS


@needs_trainer_config
def test_competition_config_spells_out_every_trainer_setting(dry_runs):
    resolved = set(runlog.parse_config(dry_runs["env:skc_competition.env"][1])) - RUN_IDENTITY
    spelled_out = set(trainrun.read_env_file(REPO_ROOT / "configs" / "skc_competition.env"))
    assert resolved, "the trainer's DRY_RUN printed no resolved config"
    assert not resolved - spelled_out, f"configs/skc_competition.env lacks {sorted(resolved - spelled_out)}"


@needs_trainer_config
def test_ablation_manifest_sets_only_trainer_settings(dry_runs):
    resolved = set(runlog.parse_config(dry_runs["env:skc_competition.env"][1]))
    manifest = sweep.load_manifest(COMPETITION_MANIFEST)
    names = {name for config in manifest.configs for name in config.overrides}
    unknown = names - resolved
    assert not unknown, f"the ablation manifest sets variables the trainer does not resolve: {sorted(unknown)}"
