"""Evaluation: the harness that scores models in thinking and non-thinking modes (pass@k,
thinking and answer tokens, format errors, the thinking budget), its backends (in process, vLLM),
the report, and its tasks (one file each under eval/tasks/; lm-eval task files in
eval/lm_eval_tasks/). `python -m distill.eval` is its command. It imports distill.students and
distill.common only."""
