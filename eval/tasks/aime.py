"""AIME-style: few hard problems with integer answers, scored over n samples per question.

Thirty questions make pass@1 from one sample too noisy to compare models, so the Qwen3 report
averages over 64 samples per question; the default here is 16 (`samples=64` for the report's
protocol), and pass@k comes from the same samples. Defaults load `HuggingFaceH4/aime_2024`
(split `train`, columns `problem` and `answer`).
"""

from distill.eval.tasks import Source, Task, question_problems
from distill.eval.tasks.gsm8k import MATH_PROMPT

TASK = Task(
    name="aime",
    load=lambda source, cache_dir: question_problems(source),
    source=Source(path="HuggingFaceH4/aime_2024", split="train", question_column="problem", answer_column="answer",
                  prompt_suffix=MATH_PROMPT),
    samples=16,
    max_new_tokens=38912,
)
