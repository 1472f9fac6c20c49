"""Ablation sweeps: run a manifest of configs x seeds, then tabulate and plot the results.

    python -m scripts.sweep configs/sweeps/cpu_smoke_manifest.json            # run (resumes)
    python -m scripts.sweep MANIFEST --gpus 8                                   # one run per GPU
    python -m scripts.sweep MANIFEST --dry-run                                  # validate every config
    python -m scripts.sweep MANIFEST --collect-only                             # tables + plot only

A manifest is JSON:
    {"description": "...",
     "base": "configs/cpu_proxy.env",          # env file, relative to the repo root
     "env": {"MAX_WALLCLOCK_SECONDS": 60},     # optional: added to the base file for every run
     "seeds": [1337, 42],
     "reference": "reference",                 # the config the deltas are measured against
     "configs": [{"name": "reference", "overrides": {}, "why": "..."},
                 {"name": "leaky", "overrides": {"MLP_ACT": "leaky_relu2"}, "why": "..."}]}
Precedence, lowest first: base file < manifest env < process environment < config overrides
< the run's SEED, RUN_ID and LOG_DIR.

Each run logs to <out>/runs/<config>_seed<seed>.log; a run whose log ends with
stop_reason:completed is not run again. Results: <out>/results.csv, <out>/results.md
(mean ± std over seeds of the scored val_bpb, delta vs the reference) and <out>/curves.png.
"""
from __future__ import annotations

import argparse
import csv
import json
import re
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from skcgolf import runlog, trainrun

CONFIG_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
CSV_FIELDS = ["config", "seed", "score_bpb", "score_mode", "score_eval_s", "val_bpb", "val_loss", "prequant_val_bpb",
              "steps", "tok_s", "ms_per_step", "total_bytes", "model_bytes", "code_bytes", "export", "partial_validation",
              *(f"router_{name}" for name in runlog.ROUTER_FIGURES), "log"]
POLL_SECONDS = 2.0


@dataclass
class SweepConfig:
    name: str
    overrides: dict
    why: str = ""


@dataclass
class Manifest:
    description: str
    base: Path
    env: dict
    seeds: list[int]
    reference: str
    configs: list[SweepConfig]


@dataclass
class Run:
    config: SweepConfig
    seed: int
    log_path: Path
    env: dict

    @property
    def label(self) -> str:
        return f"{self.config.name} seed {self.seed}"


# ----------------------------------------------------------------------------- manifest

def load_manifest(path: str | Path) -> Manifest:
    """Read and check a sweep manifest; raise ValueError naming what is wrong."""
    data = json.loads(Path(path).read_text())
    configs = [SweepConfig(c["name"], dict(c.get("overrides", {})), c.get("why", "")) for c in data["configs"]]
    names = [config.name for config in configs]
    bad_names = [name for name in names if not CONFIG_NAME.match(name)]
    if bad_names:
        raise ValueError(f"{path}: config names must be file-name safe: {bad_names}")
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: config names repeat: {names}")
    if data["reference"] not in names:
        raise ValueError(f"{path}: reference {data['reference']!r} is not one of the configs {names}")
    base = trainrun.REPO_ROOT / data["base"]
    if not base.is_file():
        raise ValueError(f"{path}: base env file {base} does not exist")
    seeds = [int(seed) for seed in data["seeds"]]
    if not seeds:
        raise ValueError(f"{path}: no seeds")
    return Manifest(data.get("description", ""), base, dict(data.get("env", {})), seeds, data["reference"], configs)


def plan_runs(manifest: Manifest, out_dir: Path) -> list[Run]:
    """Every (config, seed) run with its log path and full environment, seed-major: every config runs
    once before any runs twice, so a slow drift of the machine's speed falls on all configs alike."""
    runs_dir = out_dir / "runs"
    runs = []
    for seed in manifest.seeds:
        for config in manifest.configs:
            run_id = f"{config.name}_seed{seed}"
            identity = {"SEED": seed, "RUN_ID": run_id, "LOG_DIR": str(runs_dir)}
            env = trainrun.run_env(manifest.base, {**config.overrides, **identity}, defaults=manifest.env)
            runs.append(Run(config, seed, runs_dir / f"{run_id}.log", env))
    return runs


# ----------------------------------------------------------------------------- running

def validate_runs(runs: list[Run]) -> bool:
    """DRY_RUN=1 the trainer once per config (seeds do not change validity); True when all pass."""
    first_run_of_config = {}
    for run in runs:
        first_run_of_config.setdefault(run.config.name, run)
    all_ok = True
    for run in first_run_of_config.values():
        result = trainrun.dry_run(run.env)
        ok = result.returncode == 0
        all_ok &= ok
        print(f"{'ok  ' if ok else 'FAIL'} {run.config.name}")
        if not ok:
            print("\n".join("     " + line for line in result.stdout.strip().splitlines()[-5:]))
    return all_ok


def report_run(run: Run, returncode: int, done: int, total: int) -> None:
    figures = runlog.parse_log_file(run.log_path).summary()
    if returncode == 0 and figures["score_bpb"] is not None:
        outcome = (f"val_bpb {figures['score_bpb']:.4f} ({figures['score_mode']})  steps {figures['steps']}  "
                   f"tok/s {figures['tok_s']:.0f}")
    else:
        outcome = f"FAILED (exit {returncode}; see {run.log_path})"
    print(f"[{done}/{total}] {run.label}: {outcome}", flush=True)


def execute_runs(runs: list[Run], gpus: int) -> None:
    """Run the unfinished runs: one at a time on CPU, or one per GPU at a time with gpus > 0."""
    pending = [run for run in runs if not runlog.is_finished(run.log_path)]
    for run in runs:
        if run not in pending:
            print(f"skip {run.label}: finished ({run.log_path})")
    free_slots: list[int | None] = list(range(gpus)) if gpus > 0 else [None]
    active = {}
    done = 0
    while pending or active:
        while pending and free_slots:
            run, slot = pending.pop(0), free_slots.pop(0)
            env = run.env if slot is None else {**run.env, "CUDA_VISIBLE_DEVICES": str(slot)}
            print(f"start {run.label}" + ("" if slot is None else f" on GPU {slot}"), flush=True)
            active[trainrun.start_training(env, run.log_path)] = (run, slot)
        time.sleep(POLL_SECONDS)
        for process in [p for p in active if p.poll() is not None]:
            run, slot = active.pop(process)
            free_slots.append(slot)
            done += 1
            report_run(run, process.returncode, done, done + len(pending) + len(active))


# ----------------------------------------------------------------------------- results

def collect_rows(runs: list[Run]) -> list[dict]:
    """One row of final figures per finished run."""
    rows = []
    for run in runs:
        if runlog.is_finished(run.log_path):
            figures = runlog.parse_log_file(run.log_path).summary()
            rows.append({"config": run.config.name, "seed": run.seed, **figures, "log": str(run.log_path)})
    return rows


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (None when there are too few values)."""
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def verdict(delta: float | None, delta_se: float | None) -> str:
    """The decision rule of the developers' guide: a gain counts only beyond 2 standard errors."""
    if delta is None or delta_se is None:
        return "—"
    if abs(delta) <= 2 * delta_se:
        return "within 2σ"
    return "better beyond 2σ" if delta < 0 else "worse beyond 2σ"


def aggregate(rows: list[dict], config_names: list[str], reference: str) -> list[dict]:
    """Per config, in manifest order: runs, mean ± std of the scored val_bpb (each run's last evaluation, as its
    submission reports it: the round trip unless a config switches on sliding windows or TTT), delta vs the
    reference, means of the rest."""
    by_config = {name: [row for row in rows if row["config"] == name] for name in config_names}
    reference_bpb, reference_std = mean_std([row["score_bpb"] for row in by_config[reference]])
    summaries = []
    for name, config_rows in by_config.items():
        bpb_mean, bpb_std = mean_std([row["score_bpb"] for row in config_rows])
        delta = bpb_mean - reference_bpb if bpb_mean is not None and reference_bpb is not None else None
        delta_se = None  # the standard error of the difference of the two means (unpaired)
        if name != reference and bpb_std is not None and reference_std is not None:
            delta_se = (bpb_std ** 2 / len(config_rows) + reference_std ** 2 / len(by_config[reference])) ** 0.5
        summaries.append({
            "config": name,
            "runs": len(config_rows),
            "score_bpb_mean": bpb_mean,
            "score_bpb_std": bpb_std,
            "score_modes": sorted({row["score_mode"] for row in config_rows}),
            "delta_vs_reference": delta,
            "delta_se": delta_se,
            "verdict": verdict(delta, delta_se),
            "val_loss_mean": mean_std([row["val_loss"] for row in config_rows])[0],
            "steps_mean": mean_std([row["steps"] for row in config_rows])[0],
            "tok_s_mean": mean_std([row["tok_s"] for row in config_rows])[0],
            "total_bytes_max": max((row["total_bytes"] for row in config_rows if row["total_bytes"]), default=None),
            "partial_validation": any(row["partial_validation"] for row in config_rows),
        })
    return summaries


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def markdown_table(summaries: list[dict], reference: str) -> str:
    fmt = runlog.fmt
    lines = [f"| config | runs | scored val_bpb (mean ± std) | scored mode | Δ vs {reference} | 2 SE of Δ | verdict "
             "| round-trip val_loss | steps | tok/s | max total bytes |",
             "|---|---:|---:|---|---:|---:|---|---:|---:|---:|---:|"]
    for s in summaries:
        bpb = fmt(s["score_bpb_mean"], ".4f") + ("" if s["score_bpb_std"] is None else f" ± {s['score_bpb_std']:.4f}")
        if s["partial_validation"]:
            bpb += " (partial val)"
        two_se = None if s["delta_se"] is None else 2 * s["delta_se"]
        cells = [s["config"], str(s["runs"]), bpb, ", ".join(s["score_modes"]) or "—", fmt(s["delta_vs_reference"], "+.4f"),
                 fmt(two_se, ".4f"), s["verdict"], fmt(s["val_loss_mean"], ".4f"),
                 fmt(s["steps_mean"], ".0f"), fmt(s["tok_s_mean"], ",.0f"), fmt(s["total_bytes_max"], ",d")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_markdown(manifest: Manifest, summaries: list[dict], runs: list[Run], path: Path) -> None:
    unfinished = [run.label for run in runs if not runlog.is_finished(run.log_path)]
    parts = [f"# Sweep results: {manifest.description}", "",
             f"Base: `{manifest.base.relative_to(trainrun.REPO_ROOT)}`, seeds {manifest.seeds}; "
             "the scored val_bpb is each run's last evaluation of its exported artifact, the figure its submission "
             "reports (the round trip unless sliding windows or TTT are on); Δ < 0 is better than the reference.", "",
             markdown_table(summaries, manifest.reference), ""]
    parts += [f"- **{c.name}**: {c.why}" for c in manifest.configs if c.why]
    if unfinished:
        parts += ["", "Not finished (no stop_reason:completed line in the log): " + ", ".join(unfinished)]
    path.write_text("\n".join(parts) + "\n")


def plot_curves(runs: list[Run], path: Path) -> None:
    """Train loss and val_bpb against step, one line per run, one colour per config."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (loss_ax, bpb_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    colours = {}
    for run in runs:
        if not run.log_path.is_file():
            continue
        log = runlog.parse_log_file(run.log_path)
        label = None if run.config.name in colours else run.config.name  # one legend entry per config
        colour = colours.setdefault(run.config.name, f"C{len(colours) % 10}")
        loss_ax.plot([p["step"] for p in log.train_points], [p["train_loss"] for p in log.train_points],
                     color=colour, alpha=0.8, linewidth=1, label=label)
        bpb_ax.plot([p["step"] for p in log.val_points], [p["val_bpb"] for p in log.val_points],
                    color=colour, marker="o", markersize=3, linewidth=1, label=label)
        final_step = log.summary()["steps"]
        if log.finished and final_step is not None:
            bpb_ax.plot(final_step, log.roundtrip()["val_bpb"], color=colour, marker="x")
    for ax, title in ((loss_ax, "train loss"), (bpb_ax, "val_bpb (o: during training, x: after export round trip)")):
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if colours:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_results(manifest: Manifest, runs: list[Run], out_dir: Path) -> list[dict]:
    rows = collect_rows(runs)
    summaries = aggregate(rows, [c.name for c in manifest.configs], manifest.reference)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out_dir / "results.csv")
    write_markdown(manifest, summaries, runs, out_dir / "results.md")
    plot_curves(runs, out_dir / "curves.png")
    return summaries


# ----------------------------------------------------------------------------- main

def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("manifest", help="sweep manifest (JSON)")
    parser.add_argument("--out", type=Path, help="output folder (default: logs/sweeps/<manifest name>)")
    parser.add_argument("--gpus", type=int, default=0, help="run one process per GPU on this many GPUs (0: CPU)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="validate every config with DRY_RUN=1 and stop")
    mode.add_argument("--collect-only", action="store_true", help="only rebuild results.csv/.md and curves.png")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    manifest = load_manifest(args.manifest)
    out_dir = args.out or trainrun.REPO_ROOT / "logs" / "sweeps" / Path(args.manifest).stem
    runs = plan_runs(manifest, out_dir)
    if args.dry_run:
        return 0 if validate_runs(runs) else 1
    if not args.collect_only:
        execute_runs(runs, args.gpus)
    summaries = write_results(manifest, runs, out_dir)
    print(markdown_table(summaries, manifest.reference))
    print(f"\nresults: {out_dir / 'results.md'}, {out_dir / 'results.csv'}; curves: {out_dir / 'curves.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
