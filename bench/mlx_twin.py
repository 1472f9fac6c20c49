"""The two twins on the CPU proxy configuration: train_gpt.py and train_gpt_mlx.py, same data, same clock.

    python -m bench.proxy --data-only          # build (or reuse) the proxy data first
    python -m bench.mlx_twin                    # both twins, 10 minutes of training each, then the cross-loads
    python -m bench.mlx_twin --minutes 1        # smoke check
    python -m bench.mlx_twin --mlx-compile 0    # the MLX twin without mx.compile
    python -m bench.mlx_twin --mlx-preload /usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0
                                                # the MLX twin on OpenBLAS instead of mlx[cpu]'s reference BLAS

Each twin trains configs/cpu_proxy.env without EngramHash, which the MLX twin lacks (MODEL_COMPILE as the
file sets it for torch; the MLX twin's compilation is --mlx-compile; --mlx-preload puts a library in the MLX
twin's LD_PRELOAD, and only in its own, so the torch twin runs as it always does), then each evaluates the
other's artifact (EVAL_ARTIFACT). Prints tokens/s, steps, round-trip val_bpb, model bytes, and the val_bpb each
twin gives each artifact; writes
bench/out/mlx_twin_<timestamp>.json. Time it alone on the machine: figures taken while anything else runs
say nothing about either twin.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from skcgolf import runlog, trainrun  # noqa: E402

REPO_ROOT = trainrun.REPO_ROOT
OUT_DIR = REPO_ROOT / "bench" / "out"
DATA_DIR = OUT_DIR / "proxy_data"
ENV_FILE = REPO_ROOT / "configs" / "cpu_proxy.env"
TWIN_SETTINGS = {"ENGRAM_ENABLED": 0}  # the MLX twin has no EngramHash: both twins train the model it has
TRAINERS = {"torch": "train_gpt.py", "mlx": "train_gpt_mlx.py"}


def run(trainer: str, run_id: str, overrides: dict, preload: str = "") -> Path:
    """Run one trainer to the end with the proxy config plus overrides; returns its log."""
    log_path = OUT_DIR / "logs" / f"{run_id}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = trainrun.run_env(ENV_FILE, {"DATA_PATH": str(DATA_DIR), "TOKENIZER_PATH": str(DATA_DIR / "tokenizer.model"),
                                      "RUN_ID": run_id, "LOG_DIR": str(OUT_DIR / "logs"), **TWIN_SETTINGS,
                                      **overrides})
    if trainer == "mlx" and preload:
        env["LD_PRELOAD"] = " ".join(filter(None, (env.get("LD_PRELOAD", ""), preload)))
    print(f"== {TRAINERS[trainer]} {run_id}: log {log_path}", flush=True)
    with open(log_path, "w") as log:
        code = subprocess.run([sys.executable, TRAINERS[trainer]], env=env, cwd=REPO_ROOT, stdout=log,
                              stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise SystemExit(f"{TRAINERS[trainer]} exited with {code}; see {log_path}")
    return log_path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="training minutes per twin (default 10)")
    parser.add_argument("--mlx-compile", choices=("auto", "0", "1"), default="auto", help="MODEL_COMPILE for the MLX twin")
    parser.add_argument("--mlx-preload", default="", metavar="LIB",
                        help="a BLAS for the MLX twin's LD_PRELOAD (mlx[cpu] on Linux bundles the reference BLAS)")
    args = parser.parse_args(argv)
    if args.mlx_preload and not Path(args.mlx_preload).is_file():
        raise SystemExit(f"--mlx-preload {args.mlx_preload}: no such file")
    if not (DATA_DIR / "manifest.json").is_file():
        raise SystemExit(f"no proxy data in {DATA_DIR}: run python -m bench.proxy --data-only first")
    stamp = time.strftime("%Y%m%d_%H%M%S")
    seconds = str(args.minutes * 60)
    trained = {"torch": run("torch", f"twins_{stamp}_torch", {"MAX_WALLCLOCK_SECONDS": seconds}),
               "mlx": run("mlx", f"twins_{stamp}_mlx", {"MAX_WALLCLOCK_SECONDS": seconds,
                                                         "MODEL_COMPILE": args.mlx_compile}, args.mlx_preload)}
    summaries = {name: runlog.parse_log_file(path).summary() for name, path in trained.items()}
    cross = {}
    for writer, reader in (("torch", "mlx"), ("mlx", "torch")):
        artifact = OUT_DIR / "logs" / f"twins_{stamp}_{writer}_model.skc"
        log = run(reader, f"twins_{stamp}_{reader}_reads_{writer}", {"EVAL_ARTIFACT": str(artifact)}, args.mlx_preload)
        cross[f"{writer}_artifact"] = {writer: summaries[writer]["val_bpb"],
                                       reader: runlog.parse_log_file(log).summary()["val_bpb"]}
    fmt = runlog.fmt
    print()
    print(runlog.text_table(["twin", "tok/s", "steps", "val_bpb", "model bytes"],
                            [[name, fmt(s["tok_s"], ",.0f"), fmt(s["steps"], "d"), fmt(s["val_bpb"], ".6f"),
                              fmt(s["model_bytes"], ",d")] for name, s in summaries.items()]))
    print()
    print(runlog.text_table(["artifact", "val_bpb by torch", "val_bpb by mlx"],
                            [[name, fmt(v["torch"], ".8f"), fmt(v["mlx"], ".8f")] for name, v in cross.items()]))
    out = OUT_DIR / f"mlx_twin_{stamp}.json"
    out.write_text(json.dumps({"train_seconds": float(seconds), "mlx_compile": args.mlx_compile,
                               "mlx_preload": args.mlx_preload,
                               "twins": summaries, "cross_load_val_bpb": cross}, indent=2) + "\n")
    print(f"summary: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
