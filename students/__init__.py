"""Qwen3 student models: the size table and model building (random, pretrained, from a teacher)."""
