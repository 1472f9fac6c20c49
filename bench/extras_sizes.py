"""Parameter count and artifact bytes of each model extra (issue 10) on the CPU proxy shape, freshly initialised.

    python -m bench.extras_sizes

Prints one line per feature against the reference (cpu_proxy.env's shape, vocabulary 1024, each feature at its
defaults). Fresh output projections are zero and compress better than trained ones: the byte deltas of
EngramHash and MoE understate a trained model's (the ablation sweep's bytes column is the figure that counts).
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train_gpt  # noqa: E402

SHAPE = dict(NUM_LAYERS="4", MODEL_DIM="256", NUM_HEADS="4", NUM_KV_HEADS="2", MLP_MULT="3", TRAIN_SEQ_LEN="256")
VARIANTS = {"reference": {}, "engram_2x2": {"ENGRAM_ENABLED": "1"},
            "bigram_hash_1x1": {"ENGRAM_ENABLED": "1", "ENGRAM_NUM_HEADS": "1", "ENGRAM_NUM_ORDERS": "1"},
            "moe_4x_top1": {"MOE_ENABLED": "1"}, "xsa_last2": {"XSA_LAST_N": "2"}, "vrl": {"VRL_ENABLED": "1"},
            "smear_gate": {"SMEAR_GATE": "1"}, "ln_scale_damping": {"LN_SCALE_DAMPING": "1"}}


def main() -> None:
    reference = None
    for name, extra in VARIANTS.items():
        args = train_gpt.Hyperparameters({**SHAPE, **extra})
        args.vocab_size = 1024
        torch.manual_seed(0)
        model = train_gpt.GPT(args, args.vocab_size)
        params = train_gpt.count_parameters(model)["total"]
        size = len(train_gpt.export_model(model, args, lambda line: None).blob)
        reference = reference or (params, size)
        print(f"{name:18s} params:{params:>9,d} ({params - reference[0]:+,d})  model_bytes:{size:>9,d} "
              f"({size - reference[1]:+,d})", flush=True)


if __name__ == "__main__":
    main()
