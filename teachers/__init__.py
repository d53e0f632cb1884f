"""Teacher backends: they answer chat prompts in either mode and score token sequences with
top-k log-probabilities. `base` holds the interface, `transformers_backend` the in-process
model, `embedded` the tiny MoE teacher this project trains itself for the built-in task."""
