"""Evaluation: the harness that scores models in thinking and non-thinking modes, and its tasks
(one file each under eval/tasks/)."""
