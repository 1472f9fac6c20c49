"""skc-golf trainer for Apple MLX (issue: MLX port). Not implemented yet."""
import sys

if __name__ == "__main__":
    print("train_gpt_mlx.py: not implemented yet (use train_gpt.py on CPU or CUDA)", file=sys.stderr)
    sys.exit(2)
