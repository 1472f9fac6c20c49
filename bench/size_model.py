"""Size a configuration's artifact without training: build the model on the CPU, export it, print the bytes.

    python -m bench.size_model configs/skc_competition.env [NAME=value ...]

Weights are random (every matrix N(0, 0.02), the zero-initialized output projections included; the
rest at their initialization), so the figures are those of an untrained model: ternary trits and fp8
codes of trained weights compress about the same or slightly better, fp16 values similarly. Prints the
parameter counts by kind, the raw and compressed bytes per artifact component and the artifact line
(code bytes of train_gpt.py + model bytes against SIZE_CAP_BYTES - SIZE_MARGIN_BYTES). VOCAB_SIZE must be
set (in the env file or as an argument) since no tokenizer is read.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
import train_gpt  # noqa: E402
from skcgolf import trainrun  # noqa: E402


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    env = trainrun.read_env_file(argv[0])
    env.update(arg.split("=", 1) for arg in argv[1:])
    args = train_gpt.Hyperparameters(env)
    if not args.vocab_size:
        print("size_model: set VOCAB_SIZE (no tokenizer is read)", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    model = train_gpt.GPT(args, args.vocab_size)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2 and p is not model.tok_emb.weight:
                p.normal_(0.0, 0.02)
    print(f"config {argv[0]} " + " ".join(argv[1:]))
    print("params " + " ".join(f"{k}:{v}" for k, v in train_gpt.count_parameters(model).items()))
    t0 = time.perf_counter()
    result = train_gpt.export_model(model, args, print)
    print(f"export_time:{time.perf_counter() - t0:.0f}s packing:{result.packing} codec:{result.codec}")
    for line in train_gpt.component_report(result):
        print(line)
    print("\n".join(train_gpt.largest_tensors(result.records, 6)))
    code_bytes = (REPO_ROOT / "train_gpt.py").stat().st_size  # the whole file: a DCE'd submission is smaller
    train_gpt.account_artifact(result, code_bytes, args, print)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
