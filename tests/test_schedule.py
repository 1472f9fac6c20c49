"""The learning-rate schedule, the step-line format, and the training step's host syncs."""
import sys
from pathlib import Path

import pytest
import torch

import train_gpt
from skcgolf import trainrun

REPO_ROOT = Path(__file__).resolve().parent.parent


def args_of(**env) -> train_gpt.Hyperparameters:
    return train_gpt.Hyperparameters({k: str(v) for k, v in env.items()})


def schedule(args, step_ms: float, steps: int, first_step_ms: float | None = None) -> list[float]:
    """lr_scale of each step of a run whose steps take step_ms (the first one first_step_ms), as train() calls it."""
    scales, elapsed = [], 0.0
    for step in range(steps):
        mean = elapsed / step if step else step_ms
        scales.append(train_gpt.lr_scale(step, elapsed, args, mean))
        elapsed += first_step_ms if step == 0 and first_step_ms else step_ms
    return scales


@pytest.mark.parametrize("budget_s, step_ms", [(20, 400.0), (600, 700.0), (599, 85.0), (5, 50.0)])
def test_fraction_schedule_warms_up_then_decays_to_near_zero_at_the_cap(budget_s, step_ms):
    args = args_of(MAX_WALLCLOCK_SECONDS=budget_s, ITERATIONS=10**6)
    steps = int(1000 * budget_s / step_ms)
    scales = schedule(args, step_ms, steps)
    peak = scales.index(max(scales))
    assert all(b >= a for a, b in zip(scales[:peak], scales[1:peak + 1])), "warm-up is monotone"
    assert all(b <= a for a, b in zip(scales[peak:], scales[peak + 1:])), "warm-down is monotone"
    assert scales[1] >= scales[0] and scales[0] > 0, "no collapse after the first step"
    assert max(scales) > 0.5
    assert scales[-1] <= 2 * step_ms / (1000 * budget_s * args.warmdown_fraction) + 1e-9, "ends near 0 at the cap"


def test_fraction_schedule_follows_iterations_without_a_cap():
    args = args_of(MAX_WALLCLOCK_SECONDS=0, ITERATIONS=100, LR_WARMUP_STEPS=0, WARMDOWN_FRACTION=0.5)
    scales = schedule(args, 10.0, 100)
    assert scales[:50] == [1.0] * 50 and scales[75] == pytest.approx(0.5) and scales[99] == pytest.approx(0.02)


def test_demo_config_keeps_training_at_full_rate_after_the_first_step():
    """The issue's demo bug: a 20 s run fell from scale 1 to about 0.17 at step 2 and diverged."""
    env = trainrun.read_env_file(REPO_ROOT / "configs" / "cpu_demo.env")
    args = train_gpt.Hyperparameters({**env, "MAX_WALLCLOCK_SECONDS": "20"})
    scales = schedule(args, 400.0, 50, first_step_ms=1500.0)
    assert scales[0] < scales[1] <= scales[args.lr_warmup_steps - 1] == pytest.approx(1.0)


def test_warmdown_iters_keeps_the_official_projection_from_the_first_step():
    """WARMDOWN_ITERS=1200 on a run of about 600 steps: the official schedule decays over the whole run, from
    about budget / (1200 * step) at the start; with the warm-up's step time the first step is already on it."""
    args = args_of(MAX_WALLCLOCK_SECONDS=600, WARMDOWN_ITERS=1200, LR_WARMUP_STEPS=0, ITERATIONS=20000)
    assert args.warmdown_fraction == 0.0
    scales = schedule(args, 1000.0, 600)
    assert scales[0] == pytest.approx(0.5) and scales[1] == pytest.approx(599 / 1200)
    assert all(b <= a for a, b in zip(scales, scales[1:])) and scales[-1] < 0.01


def test_warmdown_iters_without_a_cap_counts_steps():
    args = args_of(MAX_WALLCLOCK_SECONDS=0, WARMDOWN_ITERS=10, LR_WARMUP_STEPS=0, ITERATIONS=20)
    assert schedule(args, 5.0, 20) == [1.0] * 10 + [(20 - s) / 10 for s in range(10, 20)]


def test_both_warmdown_settings_are_refused_naming_both():
    with pytest.raises(train_gpt.ConfigError, match="WARMDOWN_FRACTION=0"):
        args_of(WARMDOWN_ITERS=100, WARMDOWN_FRACTION=0.3)
    assert args_of(WARMDOWN_ITERS=100, WARMDOWN_FRACTION=0).warmdown_iters == 100


def test_step_label_shows_the_budget_as_time_when_the_clock_binds():
    assert train_gpt.step_label(20, 12_400.0, args_of(MAX_WALLCLOCK_SECONDS=600)) == "step:20 time:12s/600s"
    assert train_gpt.step_label(20, 12_400.0, args_of(MAX_WALLCLOCK_SECONDS=0, ITERATIONS=100)) == "step:20/100"


# --- host syncs --------------------------------------------------------------------------------------------------

READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "__format__", "__repr__")


@pytest.fixture
def host_reads(monkeypatch):
    """Every read of a tensor's value made directly by train_gpt.py code: (function name, method).
    On CUDA each of these is a host sync; CPU tests cannot see torch-internal syncs (bench/gpu_check.sh does)."""
    seen = []
    for method in READS:
        original = getattr(torch.Tensor, method)

        def wrapper(self, *a, __original=original, __method=method, **k):
            caller = sys._getframe(1)
            if caller.f_code.co_filename == train_gpt.__file__:
                seen.append((caller.f_code.co_name, __method))
            return __original(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, method, wrapper)
    return seen


@pytest.mark.parametrize("overrides", [{}, {"WEIGHT_QUANT": "none", "GRAD_CLIP_NORM": 1.0},
                                       {"MUON_ROW_NORM": 1, "MUON_WEIGHT_DECAY": 0.01, "EMBED_DIM": 32}])
def test_a_training_step_reads_nothing_back_from_the_device(tiny_data, host_reads, overrides):
    args = train_gpt.Hyperparameters(tiny_data.env(VOCAB_SIZE=tiny_data.sp.vocab_size(), **overrides))
    rt = train_gpt.Runtime(0, 1, 0, torch.device("cpu"), False)
    model = train_gpt.GPT(args, args.vocab_size)
    optimizers, _ = train_gpt.build_optimizers(model, args, fused=False)
    loader = train_gpt.DistributedTokenLoader(str(tiny_data.data_path), args.vocab_size, 0, 1, rt.device)
    accum, micro = train_gpt.grad_accum_steps(args, 1)
    vote = train_gpt.StopVote(rt)
    for step in range(3):
        loss, _ = train_gpt.optimizer_step(model, model, loader, optimizers, args, rt, accum, micro, step, 0.5)
        vote.post(step + 1, False, loss)
    assert host_reads == [], "host reads inside the training step"
    assert vote.take() == (3, {"time_up": False, "non_finite_loss": False, "sigterm": False, "checkpoint_due": False,
                               "moe_start": False, "recurrence_start": False})
    assert [name for name, _ in host_reads] == ["take"] and vote.take() is None


def test_stop_vote_reports_a_non_finite_loss_and_the_clock():
    vote = train_gpt.StopVote(train_gpt.Runtime(0, 1, 0, torch.device("cpu"), False))
    vote.post(7, True, torch.tensor(float("nan")))
    assert vote.take() == (7, {"time_up": True, "non_finite_loss": True, "sigterm": False, "checkpoint_due": False,
                               "moe_start": False, "recurrence_start": False})
