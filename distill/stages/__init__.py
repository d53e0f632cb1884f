"""The pipeline's stages, one module each, in the order `distill/pipeline.py` runs them:
`teacher` (the teacher, trained or loaded, in process or served), `teacher_outputs` (its
responses and top-k log-probabilities, through the cache), `training` (each student's off-policy
and on-policy stages), `evaluation` (the eval harness on the run's models) and `release`
(release folders with their model cards)."""
