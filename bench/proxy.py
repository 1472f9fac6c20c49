"""The CPU proxy track: our configurations against the official baseline's, same data, same caps.

    python -m bench.proxy                       # ours, ours_fp8 and baseline, 10 minutes of training each
    python -m bench.proxy --seeds 3             # each entry with seeds 1337, 1338, 1339: mean +- std, ratio
    python -m bench.proxy --only ours_fp8 baseline   # chosen entries (ours, ours_fp8, baseline)
    python -m bench.proxy --quick               # 2 minutes each (smoke check)
    python -m bench.proxy --only ours --minutes 5   # the issue-3 benchmark: 5 minutes of 4 x 256
    python -m bench.proxy --data-only           # build (or reuse) the proxy data and stop

Caps, scaled from the competition to this machine: model bytes <= 2,000,000 (1/8 of
the 16 MB cap; code bytes reported beside) and a training wall clock of 10 minutes.
Data: an sp1024 tokenizer trained by data/prepare.py on the training documents of
../shared/corpus/english_docs_dev.jsonl.gz (or --corpus PATH; the offline stdlib corpus
when neither exists), validation on its first --val-docs documents; built once into
bench/out/proxy_data and reused, and replaced only with --rebuild-data when it was built
from other inputs. Runs go seed by seed, every entry back to back within
a seed. An entry's score is the val_bpb its submission reports, as the competition and
build_submission.py read it: its last evaluation (the plain round trip, or sliding windows or
score-first TTT where its env file switches them on), whose evaluation must finish within
EVAL_BUDGET_S as on the GPUs. Prints per run the score, its mode and evaluation time, the plain
round-trip val_bpb, tokens/s, steps, model and code bytes; then per entry the mean +- std (sample
std over seeds) of both figures and the ratio of each of ours to the baseline (ratio of means,
with the std propagated from both); writes
bench/out/proxy_<timestamp>.json. Exits non-zero when a run fails or is over the cap.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

from skcgolf import runlog, trainrun

REPO_ROOT = trainrun.REPO_ROOT
OUT_DIR = REPO_ROOT / "bench" / "out"
DATA_DIR = OUT_DIR / "proxy_data"
SHARED_CORPUS = REPO_ROOT.parent / "shared" / "corpus" / "english_docs_dev.jsonl.gz"
MODEL_BYTES_CAP = 2_000_000
EVAL_BUDGET_S = 600.0  # the competition's evaluation limit, kept as it is (the training clock is too)
ENTRIES = {"ours": "configs/cpu_proxy.env", "ours_fp8": "configs/cpu_proxy_fp8.env",
           "baseline": "configs/baseline_cpu_proxy.env"}
DEFAULT_ENTRIES = ("ours", "ours_fp8", "baseline")
BASELINE = "baseline"
FIRST_SEED = 1337
BUILD_STAMP = "proxy_build.json"
DATA_SPEC = "sp_bpe_1024"
OFFLINE_CORPUS = "offline stdlib corpus"


# ----------------------------------------------------------------------------- data

def data_build_command(corpus: Path | None, val_docs: int) -> list[str]:
    """The data/prepare.py command that builds the proxy data (from the offline corpus when corpus is None)."""
    command = [sys.executable, "data/prepare.py", "build"]
    if corpus is not None:
        command += ["--input", str(corpus)]
    return command + ["--spec", DATA_SPEC, "--out", str(DATA_DIR), "--val-docs", str(val_docs)]


def data_identity(corpus: Path | None, val_docs: int) -> dict:
    """What decides the proxy data's content: the corpus (by name and SHA-256), the tokenizer spec and the
    validation documents. Not the output path, so that a git worktree with a copy of the data reuses it."""
    sha256 = hashlib.sha256(corpus.read_bytes()).hexdigest() if corpus is not None else None
    return {"corpus": corpus.name if corpus is not None else OFFLINE_CORPUS, "corpus_sha256": sha256,
            "spec": DATA_SPEC, "val_docs": val_docs}


def describe_data(identity: dict) -> str:
    sha = identity.get("corpus_sha256")
    return (f"{identity.get('corpus')}" + (f" (sha256 {sha[:12]})" if sha else "")
            + f", {identity.get('spec')}, {identity.get('val_docs')} validation documents")


def ensure_proxy_data(corpus: Path | None, val_docs: int, rebuild: bool) -> dict:
    """Build the proxy data unless the same build is already there; returns its manifest. Data built from
    other inputs is replaced only on request: every recorded proxy figure was measured on it, and a checkout
    without ../shared would otherwise swap the English documents for the offline corpus unnoticed."""
    identity = data_identity(corpus, val_docs)
    stamp_path = DATA_DIR / BUILD_STAMP
    manifest_path = DATA_DIR / "manifest.json"
    built = json.loads(stamp_path.read_text()) if stamp_path.is_file() and manifest_path.is_file() else None
    if built == identity and not rebuild:
        print(f"proxy data: reusing {DATA_DIR} ({describe_data(identity)})")
        return json.loads(manifest_path.read_text())
    if built is not None and not rebuild:
        raise SystemExit(f"proxy data in {DATA_DIR} was built from {describe_data(built)}, but this invocation asks "
                         f"for {describe_data(identity)}. Pass --corpus PATH and --val-docs N to match it (the corpus "
                         f"is looked up at {SHARED_CORPUS} by default), or --rebuild-data to replace it (figures "
                         "measured on the old data are then no longer comparable).")
    command = data_build_command(corpus, val_docs)
    print("proxy data: " + " ".join(command[1:]), flush=True)
    subprocess.run(command, cwd=REPO_ROOT, check=True)
    stamp_path.write_text(json.dumps(identity, indent=2) + "\n")
    return json.loads(manifest_path.read_text())


# ----------------------------------------------------------------------------- entries

def run_entry(name: str, data_manifest: dict, seconds: float, stamp: str, seed: int) -> dict:
    """Train one entry with one seed under the proxy caps; return its final figures."""
    run_id = f"proxy_{stamp}_{name}_seed{seed}"
    log_path = OUT_DIR / "logs" / f"{run_id}.log"
    env = trainrun.run_env(REPO_ROOT / ENTRIES[name], {
        "DATA_PATH": str(DATA_DIR),
        "TOKENIZER_PATH": data_manifest["tokenizer_path"],
        "MAX_WALLCLOCK_SECONDS": seconds,
        "SEED": seed,
        "RUN_ID": run_id,
        "LOG_DIR": str(OUT_DIR / "logs"),
    })
    print(f"\n== {name} seed {seed}: {ENTRIES[name]}, {seconds:.0f} s of training, log {log_path}", flush=True)
    returncode = trainrun.train(env, log_path)
    figures = runlog.parse_log_file(log_path).summary()
    figures.update(entry=name, seed=seed, env_file=ENTRIES[name], log=str(log_path), returncode=returncode)
    figures["problems"] = entry_problems(figures)
    return figures


def entry_problems(figures: dict) -> list[str]:
    """Why an entry does not count: a failed run, a missing figure, or a model over the byte cap."""
    problems = []
    if figures["returncode"] != 0:
        problems.append(f"train_gpt.py exited with {figures['returncode']} (see {figures['log']})")
    if figures["steps"] is None:
        problems.append("no train_done line: the entry did not train (is EVAL_ARTIFACT set in the environment?)")
    if figures["val_bpb"] is None:
        problems.append("no round-trip val_bpb line in the log")
    elif figures["stop_reason"] != "completed":
        problems.append("the run did not complete its evaluation (no stop_reason:completed line)")
    elif figures["score_eval_s"] is not None and figures["score_eval_s"] > EVAL_BUDGET_S:
        problems.append(f"the scored evaluation ({figures['score_mode']}) took {figures['score_eval_s']:.0f} s, "
                        f"over the {EVAL_BUDGET_S:.0f} s evaluation budget")
    if figures["model_bytes"] is None:
        problems.append("no artifact line in the log")
    elif figures["model_bytes"] > MODEL_BYTES_CAP:
        problems.append(f"model is {figures['model_bytes']:,} bytes, over the proxy cap of {MODEL_BYTES_CAP:,}")
    if figures["partial_validation"]:
        problems.append("validation was partial (VAL_MAX_TOKENS); the figure is not comparable")
    return problems


# ----------------------------------------------------------------------------- report

def print_report(results: list[dict], stats: dict[str, dict]) -> None:
    fmt = runlog.fmt
    rows = [[r["entry"], str(r.get("seed", "")), fmt(r["score_bpb"], ".4f"), r["score_mode"] or "—",
             fmt(r["score_eval_s"], ".0f"), fmt(r["val_bpb"], ".4f"), fmt(r["tok_s"], ",.0f"), fmt(r["steps"], "d"),
             fmt(r["model_bytes"], ",d"), fmt(r["code_bytes"], ",d")] for r in results]
    print()
    print(runlog.text_table(["entry", "seed", "score", "scored mode", "eval s", "round trip", "tok/s", "steps",
                             "model bytes", "code bytes"], rows))
    for r in results:
        if r["problems"]:
            print(f"{r['entry']} seed {r.get('seed')} FAILED: " + "; ".join(r["problems"]))
    if stats:
        print()
        for name, st in stats.items():
            line = (f"{name}: score {st['mean']:.4f} +- {st['std']:.4f}, round trip {st['roundtrip_mean']:.4f} +- "
                    f"{st['roundtrip_std']:.4f} over {st['n']} seed(s)")
            if st.get("ratio") is not None:
                line += (f"; ratio to {BASELINE}: score {st['ratio']:.4f} +- {st['ratio_std']:.4f}, round trip "
                         f"{st['roundtrip_ratio']:.4f} +- {st['roundtrip_ratio_std']:.4f} (< 1: ours is better)")
            print(line)


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def entry_stats(results: list[dict]) -> dict[str, dict]:
    """Per entry over its runs without problems: mean and sample std of the score (mean, std) and of the plain round
    trip (roundtrip_mean, roundtrip_std), and for ours the ratio of each mean to the baseline's with its propagated
    std (ratio, roundtrip_ratio). An entry with a failed run gets no figures."""
    names = list(dict.fromkeys(r["entry"] for r in results))
    stats = {}
    for name in names:
        runs = [r for r in results if r["entry"] == name]
        if any(r["problems"] for r in runs):
            continue
        stats[name] = {"n": len(runs), "seeds": [r.get("seed") for r in runs]}
        for prefix, figure in (("", "score_bpb"), ("roundtrip_", "val_bpb")):
            stats[name][prefix + "mean"], stats[name][prefix + "std"] = mean_std([r[figure] for r in runs])
    base = stats.get(BASELINE)
    for name, st in stats.items():
        if base is not None and name != BASELINE:
            for prefix in ("", "roundtrip_"):
                mean, std, base_mean, base_std = (st[prefix + "mean"], st[prefix + "std"],
                                                  base[prefix + "mean"], base[prefix + "std"])
                st[prefix + "ratio"] = mean / base_mean
                st[prefix + "ratio_std"] = mean / base_mean * math.hypot(std / mean, base_std / base_mean)
    return stats


def bpb_ratio(results: list[dict]) -> float | None:
    """Score ours / baseline (means over seeds); None unless both entries ran without problems."""
    return entry_stats(results).get("ours", {}).get("ratio")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    clock = parser.add_mutually_exclusive_group()
    clock.add_argument("--quick", action="store_true", help="2 minutes of training per entry")
    clock.add_argument("--minutes", type=float, default=10.0, help="training minutes per entry (default 10)")
    parser.add_argument("--only", nargs="+", choices=sorted(ENTRIES), metavar="ENTRY",
                        help=f"run these entries ({', '.join(ENTRIES)}; default: {' '.join(DEFAULT_ENTRIES)})")
    parser.add_argument("--seeds", type=int, default=1, help=f"seeds per entry, {FIRST_SEED} upwards (default 1)")
    parser.add_argument("--corpus", type=Path, default=SHARED_CORPUS if SHARED_CORPUS.is_file() else None,
                        help=f"documents (.jsonl[.gz]) to build the proxy data from (default: {SHARED_CORPUS} "
                             "when present, else the offline stdlib corpus)")
    parser.add_argument("--val-docs", type=int, default=50, help="held-out validation documents (default 50)")
    parser.add_argument("--rebuild-data", action="store_true", help="rebuild the proxy data even if present")
    parser.add_argument("--data-only", action="store_true", help="build or reuse the proxy data, then stop")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    if args.corpus is not None and not args.corpus.is_file():
        parser.error(f"--corpus {args.corpus}: no such file")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    data_manifest = ensure_proxy_data(args.corpus, args.val_docs, args.rebuild_data)
    if args.data_only:
        return 0
    seconds = 120.0 if args.quick else args.minutes * 60
    stamp = time.strftime("%Y%m%d_%H%M%S")
    names = args.only or list(DEFAULT_ENTRIES)
    results = [run_entry(name, data_manifest, seconds, stamp, seed)
               for seed in range(FIRST_SEED, FIRST_SEED + args.seeds) for name in names]
    stats = entry_stats(results)
    print_report(results, stats)
    summary = {"timestamp": stamp, "train_seconds": seconds, "model_bytes_cap": MODEL_BYTES_CAP, "seeds": args.seeds,
               "data": {"dir": str(DATA_DIR), "sources": data_manifest.get("sources"),
                        "val_tokens": data_manifest.get("val", {}).get("tokens")},
               "entries": results, "stats": stats, "score_ratio_ours_over_baseline": bpb_ratio(results)}
    summary_path = OUT_DIR / f"proxy_{stamp}.json"
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"summary: {summary_path}")
    return 1 if any(r["problems"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
