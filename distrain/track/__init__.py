"""Run outputs: metrics (JSONL, W&B), progress bar, checkpoints."""
