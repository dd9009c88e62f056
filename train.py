"""Placeholder until the training issue: exits with a clear message."""
import sys

if __name__ == "__main__":
    sys.exit("train.py: not implemented yet (Conv-TasNet training/evaluation is the next issue)")
