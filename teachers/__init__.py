"""Teachers: they answer chat prompts in either mode and score token sequences with top-k
log-probabilities. `base` holds the interface, `transformers_backend` the in-process model,
`vllm_backend` a model behind a vLLM server, `cache` the sharded teacher-output cache, and
`embedded` where the tiny MoE teacher of the built-in task is cached (the roof trains it:
distill/stages/teacher.py). Teachers train nothing; they import distill.students and
distill.common only."""
