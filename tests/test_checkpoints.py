"""Checkpoints and resume: bit-exact continuation (1 and 2 processes), optimizer state carried by parameter name,
refusal of corrupt, truncated, foreign and mismatched checkpoints, and interrupted writes."""
import pickle
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import train_gpt
from tiny_lm import REPO_ROOT_FOR_TESTS, subprocess_env

# A short schedule in which every piece of state matters: LR warm-up and warm-down, Muon momentum warm-up, an EMA
# that starts mid-run.
SCHEDULE = dict(ITERATIONS=6, CHECKPOINT_EVERY=3, CHECKPOINT_KEEP=5, WARMDOWN_ITERS=4, LR_WARMUP_STEPS=2,
                MUON_MOMENTUM_WARMUP_STEPS=4, EMA_DECAY=0.9, EMA_START_FRAC=0.3)


def folder(tiny_data, run_id: str) -> Path:
    return tiny_data.root / "logs" / f"{run_id}_checkpoints"


def log_of(tiny_data, run_id: str) -> str:
    return (tiny_data.root / "logs" / f"{run_id}.txt").read_text()


def train_losses(log: str) -> dict[int, str]:
    return {int(step): loss for step, loss in re.findall(r"^step:(\d+)/\d+ train_loss:(\S+)", log, re.M)}


def assert_same_state(a: Path, b: Path) -> None:
    """Two checkpoints hold bit-identical weights, optimizer states, EMA, loader positions and RNG states."""
    x, y = train_gpt.read_checkpoint(a), train_gpt.read_checkpoint(b)
    assert x["step"] == y["step"]
    for key in ("model", "ema"):
        assert x[key].keys() == y[key].keys()
        for name in x[key]:
            assert torch.equal(x[key][name], y[key][name]), f"{key} {name} differs"
    assert x["optimizer"].keys() == y["optimizer"].keys()
    for name, entry in x["optimizer"].items():
        other = y["optimizer"][name]
        assert entry["optimizer"] == other["optimizer"] and entry["state"].keys() == other["state"].keys()
        for k, v in entry["state"].items():
            assert torch.equal(v, other["state"][k]), f"optimizer state {k} of {name} differs"
    for rx, ry in zip(x["ranks"], y["ranks"], strict=True):
        assert rx["loader"] == ry["loader"] and torch.equal(rx["rng"]["torch"], ry["rng"]["torch"])


@pytest.fixture(scope="module")
def straight(tiny_data) -> Path:
    """Six steps straight through, with checkpoints at steps 3 and 6."""
    train_gpt.main(tiny_data.env(RUN_ID="ckpt_straight", **SCHEDULE))
    return folder(tiny_data, "ckpt_straight")


# --- bit-exact resume --------------------------------------------------------------------------------------------

def test_resume_continues_bit_exactly_in_one_process(tiny_data, straight):
    train_gpt.main(tiny_data.env(RUN_ID="ckpt_resumed", RESUME_FROM=straight / "step_00000003.ckpt", **SCHEDULE))
    assert_same_state(straight / "step_00000006.ckpt", folder(tiny_data, "ckpt_resumed") / "step_00000006.ckpt")
    first, second = log_of(tiny_data, "ckpt_straight"), log_of(tiny_data, "ckpt_resumed")
    resumed = train_losses(second)
    assert sorted(resumed) == [4, 5, 6]
    assert resumed == {step: loss for step, loss in train_losses(first).items() if step > 3}
    for key in ("final_prequant_exact", "final_ternary_brotli_roundtrip_exact"):
        assert re.search(f"^{key} .*$", first, re.M).group(0) == re.search(f"^{key} .*$", second, re.M).group(0)
    assert "resume: optimizer state carried for" in second and "fresh optimizer state" not in second


def test_resume_continues_bit_exactly_in_two_processes(tiny_data):
    """Straight through and resumed from step 3, both on 2 gloo processes; the last step, 5, is not a multiple of
    CHECKPOINT_EVERY and still gets its checkpoint."""
    config = tiny_data.env(**{**SCHEDULE, "ITERATIONS": 5, "CHECKPOINT_EVERY": 3, "WARMUP_STEPS": 0})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train_gpt.py"]
    resume = str(folder(tiny_data, "ckpt_ddp_straight") / "step_00000003.ckpt")
    for run_id, extra in (("ckpt_ddp_straight", {}), ("ckpt_ddp_resumed", {"RESUME_FROM": resume})):
        env = subprocess_env({**config, "RUN_ID": run_id, **extra})
        result = subprocess.run(cmd, cwd=REPO_ROOT_FOR_TESTS, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
    straight, resumed = folder(tiny_data, "ckpt_ddp_straight"), folder(tiny_data, "ckpt_ddp_resumed")
    assert train_gpt.read_checkpoint(straight / "step_00000005.ckpt")["world_size"] == 2
    assert_same_state(straight / "step_00000005.ckpt", resumed / "step_00000005.ckpt")
    assert train_losses(log_of(tiny_data, "ckpt_ddp_resumed")) == {
        step: loss for step, loss in train_losses(log_of(tiny_data, "ckpt_ddp_straight")).items() if step > 3}


# --- optimizer state by parameter name ---------------------------------------------------------------------------

def test_a_regrouped_parameter_keeps_its_moments(tiny_data):
    """Move a scalar into its own Adam group with weight decay and a matrix from Muon to Adam: every parameter that
    stays with its kind of optimizer keeps its state, the moved matrix starts fresh, and both facts are logged."""
    args = train_gpt.Hyperparameters(tiny_data.env())
    rt = train_gpt.Runtime(0, 1, 0, torch.device("cpu"), False)
    torch.manual_seed(0)
    model = train_gpt.GPT(args, tiny_data.sp.vocab_size())
    for p in model.parameters():
        p.data.add_(torch.randn_like(p) * 0.02)
    optimizers, _ = train_gpt.build_optimizers(model, args, fused=False)
    x = torch.randint(0, tiny_data.sp.vocab_size(), (2, 32))
    for _ in range(2):
        train_gpt.training_loss(model(x), x.roll(-1, dims=1), 0.0)[0].backward()
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
    saved = pickle.loads(pickle.dumps(train_gpt.optimizer_states(model, optimizers, rt)))
    params = dict(model.named_parameters())
    adam_names = [n for n, e in saved.items() if e["optimizer"] == "AdamW"]
    muon_names = [n for n, e in saved.items() if e["optimizer"] == "Muon"]
    moved, regrouped = muon_names[0], "skip_weights"
    assert regrouped in adam_names
    adam = torch.optim.AdamW([{"params": [params[n] for n in adam_names if n != regrouped]},
                              {"params": [params[regrouped]], "weight_decay": 0.1},
                              {"params": [params[moved]]}], lr=0.01)
    muon = train_gpt.Muon([params[n] for n in reversed(muon_names[1:])], lr=0.01, momentum=0.9, backend_steps=5)
    lines = []
    train_gpt.load_optimizer_states(model, [adam, muon], saved, rt, lines.append)
    for name in adam_names:
        for key, value in saved[name]["state"].items():
            assert torch.equal(adam.state[params[name]][key], value), f"{key} of {name} was not carried"
    for name in muon_names[1:]:
        assert torch.equal(muon.state[params[name]]["momentum_buffer"], saved[name]["state"]["momentum_buffer"])
    assert not adam.state[params[moved]]
    log = "\n".join(lines)
    assert f"{moved} (was Muon)" in log and f"has no place in this run: {moved}" in log
    assert f"carried for {len(saved) - 1} parameters" in log
    train_gpt.training_loss(model(x), x.roll(-1, dims=1), 0.0)[0].backward()
    adam.step()
    muon.step()


# --- refusals ----------------------------------------------------------------------------------------------------

class RunsCode:
    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def framed(payload: bytes) -> bytes:
    return train_gpt.checkpoint_header(payload) + payload


def test_corrupt_truncated_and_foreign_checkpoints_are_refused(straight, tmp_path):
    good = (straight / "step_00000003.ckpt").read_bytes()
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0xFF
    RunsCode.marker = str(tmp_path / "code_ran")
    cases = {"truncated": (good[:-100], "is truncated"), "flipped": (bytes(flipped), "is corrupt"),
             "foreign": (b"PK\x03\x04" + good[4:], "not an skc-golf checkpoint"),
             "empty": (b"", "not an skc-golf checkpoint"),
             "code": (framed(pickle.dumps({"format": 1, "payload": RunsCode()})), "refused")}
    for name, (blob, message) in cases.items():
        path = tmp_path / f"{name}.ckpt"
        path.write_bytes(blob)
        with pytest.raises(train_gpt.CheckpointError, match=message):
            train_gpt.read_checkpoint(path)
    assert not (tmp_path / "code_ran").exists()


@pytest.mark.parametrize("change, names", [({"MLP_MULT": 3}, ["blocks.0.mlp.fc.weight: checkpoint (128, 64), model (192, 64)"]),
                                           ({"NUM_LAYERS": 3}, ["blocks.2.attn.c_q.weight: checkpoint absent"])])
def test_a_different_architecture_stops_with_the_mismatched_tensors(tiny_data, straight, change, names):
    env = tiny_data.env(RUN_ID="ckpt_arch", RESUME_FROM=straight / "step_00000003.ckpt", RESUME_ALLOW_CONFIG_CHANGE=1,
                        **{**SCHEDULE, **change})
    with pytest.raises(train_gpt.CheckpointError, match="different architecture") as error:
        train_gpt.main(env)
    for name in names:
        assert name in str(error.value)


def test_a_config_change_is_listed_and_needs_permission(tiny_data, straight):
    resume = dict(RESUME_FROM=straight / "step_00000003.ckpt", **{**SCHEDULE, "MATRIX_LR": 0.03, "TRAIN_LOG_EVERY": 2})
    with pytest.raises(train_gpt.CheckpointError, match="MATRIX_LR: 0.04 -> 0.03") as error:
        train_gpt.main(tiny_data.env(RUN_ID="ckpt_config", **resume))
    assert "RESUME_ALLOW_CONFIG_CHANGE=1" in str(error.value) and "TRAIN_LOG_EVERY" not in str(error.value)
    train_gpt.main(tiny_data.env(RUN_ID="ckpt_config", RESUME_ALLOW_CONFIG_CHANGE=1, **resume))
    log = log_of(tiny_data, "ckpt_config")
    assert "resume: config change MATRIX_LR: 0.04 -> 0.03" in log and "train_done steps:6" in log


# --- interrupted writes and auto ---------------------------------------------------------------------------------

KILLED_WORKER = """
import os, signal, sys
sys.path.insert(0, {repo!r})
import train_gpt
real_replace = os.replace
def replace(src, dst):
    if str(dst).endswith("step_00000004.ckpt"):
        os.kill(os.getpid(), signal.SIGKILL)  # between the write (fsynced) and the rename
    real_replace(src, dst)
os.replace = replace
train_gpt.main({config!r})
"""


def test_an_interrupted_write_keeps_the_previous_checkpoint_and_auto_resumes_from_it(tiny_data, tmp_path):
    """Checkpoints on a (tiny) clock, so one every step from step 2: the write of step 4 is killed before its rename."""
    config = tiny_data.env(RUN_ID="ckpt_killed", RESUME_FROM="auto", **{**SCHEDULE, "CHECKPOINT_EVERY": 0,
                                                                          "CHECKPOINT_EVERY_SECONDS": 1e-6,
                                                                          "CHECKPOINT_KEEP": 2})
    worker = tmp_path / "worker.py"
    worker.write_text(textwrap.dedent(KILLED_WORKER.format(repo=str(REPO_ROOT_FOR_TESTS), config=config)))
    result = subprocess.run([sys.executable, str(worker)], env=subprocess_env({}), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == -9, result.stderr[-3000:]
    assert "no checkpoint in" in result.stdout  # auto with an empty run folder starts from scratch
    # the clock's request travels with the stop vote, which every rank reads one step later
    assert [int(s) for s in re.findall(r"^checkpoint step:(\d+) .* time:\d+ms$", result.stdout, re.M)] == [2, 3]
    run_folder = folder(tiny_data, "ckpt_killed")
    left = sorted(p.name for p in run_folder.iterdir())
    assert len(left) == 3 and re.fullmatch(r"\.step_00000004\.ckpt\.\d+\.tmp", left[0])  # the interrupted write
    assert left[1:] == ["step_00000002.ckpt", "step_00000003.ckpt"]
    newer = (run_folder / "step_00000003.ckpt").read_bytes()[:-1000]
    (run_folder / "step_00000005.ckpt").write_bytes(newer)  # a newer checkpoint, truncated
    train_gpt.main(config)
    log = log_of(tiny_data, "ckpt_killed")
    assert "resume: skipping" in log and "step_00000005.ckpt is truncated" in log
    assert f"resume: from {run_folder / 'step_00000003.ckpt'} step:3" in log
    # the log is appended to: the killed run's steps 1-3 stay (it died writing step 4's checkpoint), then 4-6
    assert [int(s) for s in re.findall(r"^step:(\d+)/6 train_loss:", log, re.M)] == [1, 2, 3, 4, 5, 6]
    assert sorted(p.name for p in run_folder.iterdir()) == ["step_00000005.ckpt", "step_00000006.ckpt"]
    assert "checkpoints written:2 time:" in log  # steps 5 (the clock) and 6 (the last step)


def test_every_checkpoint_in_a_folder_corrupt_is_an_error(tmp_path):
    (tmp_path / "step_00000001.ckpt").write_bytes(b"junk")
    with pytest.raises(train_gpt.CheckpointError, match="no checkpoint in .* reads back whole"):
        train_gpt.newest_valid_checkpoint(tmp_path, lambda line: None)


# --- the unlimited track ---------------------------------------------------------------------------------------------

def test_no_wallclock_cap_schedules_by_steps():
    args = train_gpt.Hyperparameters({"MAX_WALLCLOCK_SECONDS": "0", "ITERATIONS": "100", "WARMDOWN_FRACTION": "0.1",
                                      "LR_WARMUP_STEPS": "0"})
    assert train_gpt.training_seconds(args) == 0.0
    assert train_gpt.lr_scale(95, elapsed_ms=1e12, args=args, step_ms=1.0) == pytest.approx(0.5)
    assert train_gpt.training_progress(50, elapsed_ms=1e12, args=args) == pytest.approx(0.5)


def test_auto_resume_needs_a_run_folder():
    with pytest.raises(train_gpt.ConfigError, match="RESUME_FROM=auto"):
        train_gpt.Hyperparameters({"RESUME_FROM": "auto"})
    train_gpt.Hyperparameters({"RESUME_FROM": "auto", "RUN_ID": "long_run"})

