"""skcgolf/runlog.py and scripts/sweep.py on synthetic logs and a fake trainer (no torch, no data)."""
import json
import sys
import textwrap
from pathlib import Path

import pytest

from fake_logs import synthetic_log
from scripts import sweep
from skcgolf import runlog, trainrun


# ----------------------------------------------------------------------------- runlog

def test_parse_log_reads_curves_and_final_figures():
    log = runlog.parse_log(synthetic_log(val_bpb=1.23456789, steps=40, tok_s=8765))
    assert [p["step"] for p in log.train_points] == [10, 20, 30, 40]
    assert log.train_points[0]["train_loss"] == pytest.approx(3.9)
    assert [p["val_bpb"] for p in log.val_points] == [pytest.approx(1.2446)]
    assert log.config == {"NUM_LAYERS": "4", "MLP_ACT": "relu2"}
    figures = log.summary()
    assert figures["val_bpb"] == pytest.approx(1.23456789, abs=1e-9)  # the _exact line wins
    assert figures["steps"] == 40 and figures["tok_s"] == 8765 and figures["ms_per_step"] == pytest.approx(100)
    assert (figures["total_bytes"], figures["model_bytes"], figures["code_bytes"]) == (1550000, 1500000, 50000)
    assert figures["export"] == "ternary_brotli" and figures["attn_backend"] == "sdpa"
    assert figures["peak_mem_mib"] == 1234 and figures["partial_validation"] is False


def test_unfinished_and_partial_logs_are_recognized(tmp_path):
    assert not runlog.parse_log(synthetic_log(finished=False)).finished
    assert runlog.parse_log(synthetic_log(partial=True)).summary()["partial_validation"]
    assert runlog.parse_log(synthetic_log(export="int8_zlib")).export == "int8_zlib"
    path = tmp_path / "run.log"
    assert not runlog.is_finished(path)
    path.write_text(synthetic_log(finished=False))
    assert not runlog.is_finished(path)
    path.write_text(synthetic_log())
    assert runlog.is_finished(path)


def test_a_run_killed_during_a_later_evaluation_mode_is_not_finished():
    killed = runlog.parse_log(synthetic_log(modes=[("sliding_window", 1.4, 30.0)], stopped=False))
    assert killed.export == "ternary_brotli" and not killed.finished
    assert runlog.parse_log(synthetic_log(modes=[("sliding_window", 1.4, 30.0)])).finished


def test_the_score_is_the_last_exact_line_as_the_submission_reports_it():
    plain = runlog.parse_log(synthetic_log(val_bpb=1.5)).summary()
    assert (plain["score_mode"], plain["score_bpb"], plain["score_eval_s"]) == ("ternary_brotli_roundtrip", 1.5, 0.06)
    modes = [("sliding_window", 1.45, 30.0), ("ttt", 1.41234567, 75.5)]
    figures = runlog.parse_log(synthetic_log(val_bpb=1.5, modes=modes)).summary()
    assert figures["val_bpb"] == 1.5  # the round trip stays what it is
    assert (figures["score_mode"], figures["score_bpb"], figures["score_eval_s"]) == ("ttt", 1.41234567, 75.5)


def test_parse_pairs_handles_nan_and_exponents():
    assert runlog.parse_pairs("step:3/10 train_loss:nan lr:1e-3 x:-2.5") == {
        "step": 3, "train_loss": pytest.approx(float("nan"), nan_ok=True), "lr": 0.001, "x": -2.5}


def test_parse_config_reads_both_dump_formats():
    assert runlog.parse_config("config NUM_LAYERS=4\nMODEL_DIM: 256\nsome other line") == {
        "NUM_LAYERS": "4", "MODEL_DIM": "256"}


# ----------------------------------------------------------------------------- aggregation

def row(config, seed, bpb, tok_s=1000.0, total_bytes=100, mode="ternary_brotli_roundtrip", roundtrip_bpb=None):
    return {"config": config, "seed": seed, "score_bpb": bpb, "score_mode": mode, "val_bpb": roundtrip_bpb or bpb,
            "val_loss": bpb * 2, "steps": 10, "tok_s": tok_s, "total_bytes": total_bytes, "partial_validation": False}


def test_aggregate_gives_mean_std_and_delta_vs_reference():
    rows = [row("ref", 1, 1.50), row("ref", 2, 1.52), row("leaky", 1, 1.47, total_bytes=120), row("leaky", 2, 1.49),
            row("sliding", 1, 1.45, mode="sliding_window", roundtrip_bpb=1.50)]
    ref, leaky, sliding, missing = sweep.aggregate(rows, ["ref", "leaky", "sliding", "missing"], "ref")
    assert ref["score_bpb_mean"] == pytest.approx(1.51) and ref["score_bpb_std"] == pytest.approx(0.0141421, rel=1e-4)
    assert ref["delta_vs_reference"] == pytest.approx(0.0)
    assert leaky["delta_vs_reference"] == pytest.approx(-0.03) and leaky["total_bytes_max"] == 120
    assert sliding["delta_vs_reference"] == pytest.approx(-0.06)  # compared by what the submission reports
    assert missing["runs"] == 0 and missing["score_bpb_mean"] is None and missing["delta_vs_reference"] is None
    table = sweep.markdown_table([ref, leaky, sliding, missing], "ref")
    assert "| leaky | 2 | 1.4800 ± 0.0141 | ternary_brotli_roundtrip | -0.0300 | 0.0283 | better beyond 2σ |" in table
    assert "| sliding | 1 | 1.4500 | sliding_window | -0.0600 | — | — |" in table
    assert "| missing | 0 | — | — | — | — | — |" in table
    assert "| ref | 2 | 1.5100 ± 0.0141 | ternary_brotli_roundtrip | +0.0000 | — | — |" in table


def test_verdict_counts_a_gain_only_beyond_two_standard_errors():
    assert sweep.verdict(-0.03, 0.01) == "better beyond 2σ"
    assert sweep.verdict(-0.02, 0.01) == "within 2σ" and sweep.verdict(0.015, 0.01) == "within 2σ"
    assert sweep.verdict(0.05, 0.01) == "worse beyond 2σ"
    assert sweep.verdict(-0.5, None) == "—"  # one seed: no standard error, no verdict


def test_single_seed_has_no_std():
    (summary,) = sweep.aggregate([row("ref", 1, 1.5)], ["ref"], "ref")
    assert summary["score_bpb_std"] is None
    assert "| ref | 1 | 1.5000 | ternary_brotli_roundtrip | +0.0000 |" in sweep.markdown_table([summary], "ref")


# ----------------------------------------------------------------------------- manifests and a fake trainer

FAKE_TRAINER = textwrap.dedent('''
    """Stands in for train_gpt.py: prints a log whose val_bpb depends on MLP_ACT and SEED."""
    import os, sys
    sys.path.insert(0, {tests!r})
    from fake_logs import synthetic_log
    with open(os.environ["FAKE_TRAINER_CALLS"], "a") as calls:
        calls.write(os.environ.get("RUN_ID", "dry") + os.environ.get("CUDA_VISIBLE_DEVICES", "") + "\\n")
    if os.environ.get("DRY_RUN") == "1":
        sys.exit(3 if os.environ.get("MLP_ACT") == "bogus" else 0)
    bpb = 1.5 - 0.02 * (os.environ.get("MLP_ACT") == "leaky_relu2") + int(os.environ["SEED"]) * 1e-3
    print(synthetic_log(val_bpb=bpb, tok_s=int(os.environ["TRAIN_BATCH_TOKENS"])))
''')


@pytest.fixture
def fake_sweep(tmp_path, monkeypatch):
    """A two-config, two-seed manifest run by a fake trainer; returns (manifest path, out dir, calls file)."""
    trainer = tmp_path / "fake_train_gpt.py"
    trainer.write_text(FAKE_TRAINER.format(tests=str(Path(__file__).parent)))
    calls = tmp_path / "calls.txt"
    calls.touch()
    monkeypatch.setattr(trainrun, "TRAINER", trainer)
    monkeypatch.setattr(sweep, "POLL_SECONDS", 0.02)
    monkeypatch.setenv("FAKE_TRAINER_CALLS", str(calls))
    for name in ("MLP_ACT", "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(name, raising=False)
    manifest = {"description": "test", "base": "configs/cpu_proxy.env", "env": {"TRAIN_BATCH_TOKENS": 4096},
                "seeds": [1, 3], "reference": "reference",
                "configs": [{"name": "reference", "overrides": {}, "why": "as is"},
                            {"name": "leaky", "overrides": {"MLP_ACT": "leaky_relu2"}}]}
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(manifest))
    return path, tmp_path / "out", calls


def test_sweep_runs_collects_plots_and_resumes(fake_sweep, capsys):
    manifest, out, calls = fake_sweep
    assert sweep.main([str(manifest), "--out", str(out)]) == 0
    assert sorted(p.name for p in (out / "runs").glob("*.log")) == [
        "leaky_seed1.log", "leaky_seed3.log", "reference_seed1.log", "reference_seed3.log"]
    csv_lines = (out / "results.csv").read_text().splitlines()
    assert csv_lines[0].startswith("config,seed,score_bpb,score_mode,score_eval_s,val_bpb") and len(csv_lines) == 5
    assert "4096" in csv_lines[1]  # the manifest's env reached the run
    results = (out / "results.md").read_text()
    assert "| leaky | 2 | 1.4820 ± 0.0014 | ternary_brotli_roundtrip | -0.0200 |" in results and "**reference**: as is" in results
    assert (out / "curves.png").stat().st_size > 1000
    assert len(calls.read_text().split()) == 4

    (out / "runs" / "leaky_seed3.log").write_text(synthetic_log(finished=False))  # an interrupted run
    capsys.readouterr()
    assert sweep.main([str(manifest), "--out", str(out)]) == 0
    assert calls.read_text().split()[4:] == ["leaky_seed3"]
    assert capsys.readouterr().out.count("skip ") == 3


def test_gpu_mode_gives_each_concurrent_run_its_own_device(fake_sweep):
    manifest, out, calls = fake_sweep
    assert sweep.main([str(manifest), "--out", str(out), "--gpus", "2"]) == 0
    devices = [call[-1] for call in calls.read_text().split()]
    assert len(devices) == 4 and set(devices) == {"0", "1"}


def test_collect_only_and_dry_run_start_no_training(fake_sweep, capsys):
    manifest, out, calls = fake_sweep
    assert sweep.main([str(manifest), "--out", str(out), "--collect-only"]) == 0
    assert "Not finished" in (out / "results.md").read_text() and calls.read_text() == ""
    assert sweep.main([str(manifest), "--dry-run"]) == 0
    assert calls.read_text().split() == ["reference_seed1", "leaky_seed1"]  # one check per config


def test_dry_run_reports_a_config_the_trainer_rejects(fake_sweep, capsys):
    manifest, _, _ = fake_sweep
    data = json.loads(manifest.read_text())
    data["configs"][1]["overrides"]["MLP_ACT"] = "bogus"
    manifest.write_text(json.dumps(data))
    assert sweep.main([str(manifest), "--dry-run"]) == 1
    assert "FAIL leaky" in capsys.readouterr().out


def test_manifest_errors_are_named(tmp_path):
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"base": "configs/cpu_proxy.env", "seeds": [1], "reference": "nope",
                                "configs": [{"name": "a", "overrides": {}}]}))
    with pytest.raises(ValueError, match="reference 'nope'"):
        sweep.load_manifest(path)


@pytest.mark.parametrize("name", ["competition_ablation_manifest.json", "cpu_smoke_manifest.json"])
def test_shipped_manifests_load(name):
    manifest = sweep.load_manifest(trainrun.REPO_ROOT / "configs" / "sweeps" / name)
    assert manifest.reference in [config.name for config in manifest.configs]
    assert all(name == name.upper() for config in manifest.configs for name in config.overrides)
