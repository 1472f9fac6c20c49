"""bench/proxy.py's cap checks and bench/gpu_report.py's projection, on synthetic logs (no training)."""

import pytest

from bench import gpu_report, proxy
from fake_logs import synthetic_log
from skcgolf import runlog


def entry(name="ours", val_bpb=1.5, model_bytes=1_500_000, returncode=0, partial=False, modes=(), stopped=None):
    figures = runlog.parse_log(synthetic_log(val_bpb=val_bpb, partial=partial, modes=modes, stopped=stopped)).summary()
    figures.update(entry=name, model_bytes=model_bytes, returncode=returncode, log="x.log")
    figures["problems"] = proxy.entry_problems(figures)
    return figures


def test_entry_within_the_caps_has_no_problems():
    assert entry()["problems"] == []


def test_model_over_the_proxy_cap_fails_loudly():
    (problem,) = entry(model_bytes=2_000_001)["problems"]
    assert "2,000,001 bytes, over the proxy cap of 2,000,000" in problem


def test_failed_run_and_partial_validation_are_problems():
    assert any("exited with 1" in p for p in entry(returncode=1)["problems"])
    assert any("partial" in p for p in entry(partial=True)["problems"])


def test_an_entry_is_scored_by_its_last_evaluation_within_the_evaluation_budget():
    sliding = entry("ours", 1.5, modes=[("sliding_window", 1.2, 40.0)])
    assert sliding["problems"] == [] and proxy.bpb_ratio([sliding, entry("baseline", 1.5)]) == pytest.approx(0.8)
    stats = proxy.entry_stats([sliding, entry("baseline", 1.5)])["ours"]
    assert stats["roundtrip_ratio"] == pytest.approx(1.0) and stats["ratio"] == pytest.approx(0.8)
    (problem,) = entry("ours", 1.5, modes=[("ttt", 1.2, 601.0)])["problems"]
    assert "ttt" in problem and "601 s, over the 600 s evaluation budget" in problem
    (problem,) = entry("ours", 1.5, modes=[("ttt", 1.2, 60.0)], stopped=False)["problems"]
    assert "did not complete its evaluation" in problem


def test_ratio_needs_both_entries_without_problems():
    ours, baseline = entry("ours", 1.2), entry("baseline", 1.5)
    assert proxy.bpb_ratio([ours, baseline]) == pytest.approx(0.8)
    assert proxy.bpb_ratio([ours]) is None
    assert proxy.bpb_ratio([ours, entry("baseline", 1.5, model_bytes=3_000_000)]) is None


def test_gpu_projection_assumes_eight_times_the_one_gpu_throughput(tmp_path, capsys):
    assert gpu_report.projected_steps(800.0) == pytest.approx(6000)  # 600 s / (800 ms / 8)
    log = tmp_path / "competition.log"
    log.write_text(synthetic_log(steps=40))  # 100 ms/step, attn_backend sdpa, peak 1234 MiB
    assert gpu_report.main([f"competition={log}", f"baseline={tmp_path / 'missing.log'}"]) == 0
    out = capsys.readouterr().out
    assert "100.0" in out and "48,000" in out and "1,234" in out and "sdpa" in out
    assert "projection" in out and "not a measurement" in out


def test_an_entry_that_did_not_train_is_a_problem():
    figures = entry()
    figures["steps"] = None  # e.g. EVAL_ARTIFACT left in the environment: evaluation only
    assert any("did not train" in p for p in proxy.entry_problems(figures))


def test_seeds_give_mean_std_and_the_ratio_of_means():
    results = [entry("ours", 1.2), entry("baseline", 1.5), entry("ours", 1.4), entry("baseline", 1.5)]
    stats = proxy.entry_stats(results)
    assert stats["ours"]["mean"] == pytest.approx(1.3) and stats["ours"]["std"] == pytest.approx(0.1414, abs=1e-4)
    assert stats["baseline"]["std"] == 0.0 and "ratio" not in stats["baseline"]
    assert stats["ours"]["ratio"] == pytest.approx(1.3 / 1.5)
    assert stats["ours"]["ratio_std"] == pytest.approx(1.3 / 1.5 * 0.1414 / 1.3, abs=1e-4)
    assert proxy.bpb_ratio(results) == pytest.approx(1.3 / 1.5)
    assert "ours" not in proxy.entry_stats(results + [entry("ours", 1.2, returncode=1)])


def test_seeds_must_be_positive():
    with pytest.raises(SystemExit):
        proxy.parse_args(["--seeds", "0"])
    assert proxy.parse_args(["--seeds", "3", "--only", "ours_fp8", "baseline"]).only == ["ours_fp8", "baseline"]


@pytest.fixture
def proxy_data_dir(tmp_path, monkeypatch):
    """bench/proxy.py pointed at an empty data folder, with data/prepare.py replaced by a stub that records its
    command and writes a manifest."""
    data_dir = tmp_path / "proxy_data"
    builds = []

    def fake_build(command, cwd, check):
        builds.append(command)
        data_dir.mkdir(exist_ok=True)
        (data_dir / "manifest.json").write_text('{"val": {"tokens": 7}}')

    monkeypatch.setattr(proxy, "DATA_DIR", data_dir)
    monkeypatch.setattr(proxy.subprocess, "run", fake_build)
    return data_dir, builds


def test_proxy_data_is_reused_by_its_inputs_and_never_swapped_for_another_corpus(proxy_data_dir, tmp_path):
    data_dir, builds = proxy_data_dir
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text('{"text": "a"}\n')
    assert proxy.ensure_proxy_data(corpus, 50, rebuild=False) == {"val": {"tokens": 7}}
    assert builds[0][builds[0].index("--input") + 1] == str(corpus)
    proxy.ensure_proxy_data(corpus, 50, rebuild=False)
    assert len(builds) == 1, "the same inputs reuse the data"
    for other_corpus, val_docs in ((None, 50), (corpus, 20)):
        with pytest.raises(SystemExit, match="--rebuild-data"):
            proxy.ensure_proxy_data(other_corpus, val_docs, rebuild=False)
    assert len(builds) == 1, "data built from other inputs is not replaced unasked"
    corpus.write_text('{"text": "b"}\n')
    with pytest.raises(SystemExit, match="docs.jsonl"):
        proxy.ensure_proxy_data(corpus, 50, rebuild=False)
    proxy.ensure_proxy_data(None, 50, rebuild=True)
    assert "--input" not in builds[1]
    assert proxy.ensure_proxy_data(None, 50, rebuild=False) and len(builds) == 2
