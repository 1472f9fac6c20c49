"""Summarize bench/gpu_check.sh runs: ms/step, memory, attention backend, 8xH100 projection.

    python -m bench.gpu_report competition=LOG baseline=LOG
The first run is compared with the others (ms/step ratio).
"""
from __future__ import annotations

import sys
from pathlib import Path

from skcgolf import runlog

COMPETITION_MS = 600_000
GPUS_PROJECTED = 8


def ms_per_step(log: runlog.RunLog) -> float | None:
    """Timed ms/step: train_done's train_time / steps, else the last step line's step_avg."""
    figure = log.summary()["ms_per_step"]
    if figure is None and log.train_points:
        figure = log.train_points[-1].get("step_avg")
    return figure


def projected_steps(ms: float | None) -> float | None:
    """Steps in 600 s on 8 GPUs at the same global batch, assuming 8x the 1-GPU throughput."""
    return None if not ms else COMPETITION_MS / (ms / GPUS_PROJECTED)


def main(argv: list[str]) -> int:
    if not argv or any("=" not in arg for arg in argv):
        print(__doc__)
        return 2
    runs = [arg.split("=", 1) for arg in argv]
    fmt = runlog.fmt
    timings, rows = {}, []
    for name, path in runs:
        log = runlog.parse_log_file(path) if Path(path).is_file() else runlog.RunLog()
        figures, ms = log.summary(), ms_per_step(log)
        timings[name] = ms
        rows.append([name, fmt(ms, ".1f"), fmt(figures["tok_s"], ",.0f"), fmt(log.peak_mem_mib, ",.0f"),
                     log.attn_backend or "—", fmt(projected_steps(ms), ",.0f"), fmt(figures["total_bytes"], ",d")])
    header = ["config", "ms/step", "tok/s", "peak MiB", "attn", "steps in 600 s on 8xH100*", "artifact bytes"]
    print(runlog.text_table(header, rows))
    first = runs[0][0]
    for name, _ in runs[1:]:
        if timings[first] and timings[name]:
            print(f"ms/step {first} / {name}: {timings[first] / timings[name]:.2f}")
    print(f"* projection: {COMPETITION_MS // 1000} s / (1-GPU ms/step / {GPUS_PROJECTED}), same global batch, "
          "perfect scaling assumed; not a measurement")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
