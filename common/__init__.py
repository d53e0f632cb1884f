"""The ground floor every layer may import: one-line user errors, atomic files and output
folders, the run log (metrics JSONL and W&B), strict config dataclasses, and the Hydra command
line both commands share. It imports nothing of the project."""
