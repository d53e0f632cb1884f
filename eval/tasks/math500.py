"""MATH-500-style competition math: a problem, and a reference final answer in LaTeX.

Defaults load `HuggingFaceH4/MATH-500` (split `test`, columns `problem` and `answer`); a local
file with those columns works the same way. Answers such as `\\frac{\\sqrt{3}}{2}`, intervals and
sets are compared symbolically by math-verify.
"""

from distill.eval.tasks import Source, Task, question_problems
from distill.eval.tasks.gsm8k import MATH_PROMPT

TASK = Task(
    name="math500",
    load=lambda source, cache_dir: question_problems(source),
    source=Source(path="HuggingFaceH4/MATH-500", split="test", question_column="problem", answer_column="answer",
                  prompt_suffix=MATH_PROMPT),
    max_new_tokens=8192,
)
