"""Synthetic train_gpt.py logs for the tests of skcgolf/runlog.py and scripts/sweep.py."""


def synthetic_log(val_bpb=1.5, steps=40, tok_s=9000.0, finished=True, export="ternary_brotli", partial=False,
                  modes=(), stopped=None):
    """A log in the trainer's format: config dump, step lines, val lines, final lines; `modes` are
    (name, val_bpb, eval seconds) of evaluation modes after the round trip; `stopped` says whether the
    stop_reason:completed line ends it (default: when finished)."""
    lines = ["config NUM_LAYERS=4", "config MLP_ACT=relu2", "attn_backend:sdpa"]
    for step in range(10, steps + 1, 10):
        lines.append(f"step:{step}/{steps} train_loss:{4.0 - step / 100:.4f} lr_scale:1.000 tok_s:{tok_s:.0f} "
                     f"train_time:{step * 100}ms step_avg:100.00ms remaining:{steps - step}s")
    lines.append(f"step:{steps}/{steps} val_loss:{val_bpb * 1.7:.4f} val_bpb:{val_bpb + 0.01:.4f} "
                 f"train_time:{steps * 100}ms step_avg:100.00ms")
    if partial:
        lines.append("WARNING: PARTIAL VALIDATION over 65536 tokens")
    lines.append(f"train_done steps:{steps} train_time:{steps * 100}ms tok_s:{tok_s:.0f} peak_mem_mib:1234")
    if finished:
        lines += [f"final_prequant val_loss:{val_bpb * 1.7:.4f} val_bpb:{val_bpb:.4f} eval_time:50ms",
                  "artifact code_bytes:50000 model_bytes:1500000 total_bytes:1550000 cap_bytes:16000000 "
                  "headroom_bytes:14450000 margin_bytes:20000",
                  f"final_{export}_roundtrip val_loss:{val_bpb * 1.7:.4f} val_bpb:{val_bpb:.4f} eval_time:60ms",
                  f"final_{export}_roundtrip_exact val_loss:{val_bpb * 1.7:.8f} val_bpb:{val_bpb:.8f}"]
        for name, bpb, seconds in modes:
            lines += [f"final_{name} progress:1024/2048 elapsed:1s eta:1s",
                      f"final_{name} val_loss:{bpb * 1.7:.4f} val_bpb:{bpb:.4f} eval_time:{seconds * 1000:.0f}ms",
                      f"final_{name}_exact val_loss:{bpb * 1.7:.8f} val_bpb:{bpb:.8f}"]
    if stopped or (stopped is None and finished):
        lines.append(f"stop_reason:completed steps:{steps}")
    return "\n".join(lines) + "\n"
