"""distill: strong-to-weak knowledge distillation for Qwen3 students (entry point, stages,
losses, training loop). Run `python -m distill --help`."""
