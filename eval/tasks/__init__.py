"""Eval tasks, one file each: how problems are made or loaded, and how an answer is checked."""
