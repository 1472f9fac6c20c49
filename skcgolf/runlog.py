"""Read train_gpt.py logs: step curves, final figures, and whether a run finished.

One parser for every tool that reads logs (scripts/sweep.py, bench/proxy.py,
bench/gpu_report.py, build_submission.py). The log format is the one in the trainer's interface:
  config NAME=value
  step:S/N train_loss:L lr_scale:X tok_s:T train_time:Tms step_avg:Ams remaining:Rs
  step:S/N val_loss:L val_bpb:B train_time:Tms step_avg:Ams
  train_done steps:S train_time:Tms tok_s:T
  artifact code_bytes:C model_bytes:M total_bytes:T cap_bytes:... headroom_bytes:... margin_bytes:...
  final_<export>_roundtrip val_loss:L val_bpb:B eval_time:Tms   (+ the same with _exact, 8 decimals)
  final_<mode> val_loss:L val_bpb:B eval_time:Tms (+ _exact)    (each evaluation mode switched on, after it)
  router_health_final step:S top1_p_mean:P max_frac_mean:F max_frac_max:F entropy_mean:H ln_experts:L aux_mean:A
      active_min:N collapsed:0|1                                    (MoE runs only)
  stop_reason:completed steps:S                                    (the last line of a run that finished)
A run is finished when its log ends with `stop_reason:completed`. Its score is the last `_exact` line: the
evaluation the submission reports (sliding windows or score-first TTT where they are on), as
build_submission.py reads it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

PAIR = re.compile(r"(\w+):(-?(?:nan|inf|\d+(?:\.\d*)?(?:[eE][-+]?\d+)?))")
CONFIG_LINE = re.compile(r"^(?:config\s+)?([A-Za-z][A-Za-z0-9_]*)(?:=|:\s+)(.*)$")
ROUNDTRIP_KEY = re.compile(r"^final_(\w+)_roundtrip$")
SCORE_KEY = re.compile(r"^final_(\w+)_exact$")
ATTN_BACKEND = re.compile(r"\battn_backend[:=]\s*(\w+)")
PEAK_MEM = re.compile(r"\bpeak_mem_mib[:=]\s*(\d+(?:\.\d+)?)")
FINAL_KEYS = ("train_done", "artifact", "router_health_final")
ROUTER_FIGURES = ("top1_p_mean", "max_frac_mean", "max_frac_max", "entropy_mean", "aux_mean", "active_min", "collapsed")


def parse_pairs(line: str) -> dict[str, float]:
    """All `name:number` pairs of a line, as floats."""
    return {name: float(value) for name, value in PAIR.findall(line)}


def parse_config(text: str) -> dict[str, str]:
    """The resolved config dumped at the top of a log or by DRY_RUN=1 (`config NAME=value` or `NAME: value`)."""
    config = {}
    for line in text.splitlines():
        match = CONFIG_LINE.match(line.strip())
        if match:
            config[match.group(1).upper()] = match.group(2).strip()
    return config


@dataclass
class RunLog:
    """What one training log says."""
    config: dict[str, str] = field(default_factory=dict)
    train_points: list[dict[str, float]] = field(default_factory=list)  # step, train_loss, tok_s, ...
    val_points: list[dict[str, float]] = field(default_factory=list)  # step, val_loss, val_bpb, ...
    finals: dict[str, dict[str, float]] = field(default_factory=dict)  # first word of a final line -> pairs
    attn_backend: str | None = None
    peak_mem_mib: float | None = None
    partial_validation: bool = False
    stop_reason: str | None = None  # completed, interrupted, failed, ... (None: the run has not stopped)

    @property
    def export(self) -> str | None:
        """The export format named by the round-trip line (e.g. ternary_brotli, int8_zlib)."""
        for key in self.finals:
            match = ROUNDTRIP_KEY.match(key)
            if match:
                return match.group(1)
        return None

    @property
    def finished(self) -> bool:
        """The run completed: trained, exported and ran every evaluation mode (a run killed during a later mode
        has its round-trip line but not its score)."""
        return self.stop_reason == "completed" and self.export is not None

    def roundtrip(self) -> dict[str, float]:
        """Round-trip val_loss/val_bpb, the 8-decimal `_exact` figures where the log has them."""
        if self.export is None:
            return {}
        key = f"final_{self.export}_roundtrip"
        return {**self.finals[key], **self.finals.get(key + "_exact", {})}

    def score(self) -> dict:
        """The scored evaluation: the last `_exact` line's mode (e.g. ternary_brotli_roundtrip, sliding_window, ttt),
        its val_loss/val_bpb and its eval_time (ms, from the line without _exact); {} before the first."""
        modes = [match.group(1) for key in self.finals if (match := SCORE_KEY.match(key))]
        if not modes:
            return {}
        mode = modes[-1]
        return {"mode": mode, **self.finals.get(f"final_{mode}", {}), **self.finals[f"final_{mode}_exact"]}

    def summary(self) -> dict:
        """The final figures a table needs; None where the log does not have them."""
        roundtrip, score = self.roundtrip(), self.score()
        done = self.finals.get("train_done", {})
        artifact = self.finals.get("artifact", {})
        steps = done.get("steps")
        train_time_ms = done.get("train_time")
        return {
            "val_bpb": roundtrip.get("val_bpb"),
            "val_loss": roundtrip.get("val_loss"),
            "score_mode": score.get("mode"),
            "score_bpb": score.get("val_bpb"),
            "score_eval_s": score["eval_time"] / 1000.0 if "eval_time" in score else None,
            "prequant_val_bpb": self.finals.get("final_prequant", {}).get("val_bpb"),
            "steps": int(steps) if steps is not None else None,
            "tok_s": done.get("tok_s"),
            "ms_per_step": train_time_ms / steps if steps and train_time_ms is not None else None,
            "total_bytes": _int_or_none(artifact.get("total_bytes")),
            "model_bytes": _int_or_none(artifact.get("model_bytes")),
            "code_bytes": _int_or_none(artifact.get("code_bytes")),
            "export": self.export,
            "partial_validation": self.partial_validation,
            "stop_reason": self.stop_reason,
            "attn_backend": self.attn_backend,
            "peak_mem_mib": self.peak_mem_mib,
            **{f"router_{name}": self.finals.get("router_health_final", {}).get(name) for name in ROUTER_FIGURES},
        }


def fmt(value, spec: str) -> str:
    """A figure for a table: format(value, spec), or a dash when the log did not have it."""
    return "—" if value is None else format(value, spec)


def text_table(header: list[str], rows: list[list[str]]) -> str:
    """A plain-text table: every column as wide as its widest cell, the first left-aligned, the rest right."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) if i == 0 else cell.rjust(width)
                               for i, (cell, width) in enumerate(zip(row, widths))).rstrip()
                     for row in [header, *rows])


def _int_or_none(value: float | None) -> int | None:
    return int(value) if value is not None else None


def _read_step_line(log: RunLog, line: str) -> None:
    pairs = parse_pairs(line)
    if "train_loss" in pairs:
        log.train_points.append(pairs)
    elif "val_bpb" in pairs:
        log.val_points.append(pairs)


def _read_line(log: RunLog, line: str) -> None:
    words = line.split(maxsplit=1)
    if not words:
        return
    first = words[0]
    if first.startswith("step:"):
        _read_step_line(log, line)
    elif first.startswith("final_") or first in FINAL_KEYS:
        log.finals[first] = parse_pairs(line)
    elif first == "config":
        log.config.update(parse_config(line))
    elif first.startswith("stop_reason:"):
        log.stop_reason = first.partition(":")[2]
    if "PARTIAL VALIDATION" in line:
        log.partial_validation = True
    if backend := ATTN_BACKEND.search(line):
        log.attn_backend = backend.group(1)
    if peak := PEAK_MEM.search(line):
        log.peak_mem_mib = max(float(peak.group(1)), log.peak_mem_mib or 0.0)


def parse_log(text: str) -> RunLog:
    log = RunLog()
    for line in text.splitlines():
        _read_line(log, line.strip())
    return log


def parse_log_file(path: str | Path) -> RunLog:
    return parse_log(Path(path).read_text(errors="replace"))


def is_finished(path: str | Path) -> bool:
    """True when the log at path exists and says the run completed (the run need not be redone)."""
    return Path(path).is_file() and parse_log_file(path).finished
