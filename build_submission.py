"""Packs a record folder for a Parameter Golf submission (later issue). Not implemented yet."""
import sys

if __name__ == "__main__":
    print("build_submission.py: not implemented yet", file=sys.stderr)
    sys.exit(2)
