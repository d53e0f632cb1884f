"""GSM8K-style grade-school math: a question, and a reference solution ending in `#### answer`.

Defaults load `openai/gsm8k` (config `main`, split `test`) from the hub; any local JSONL/Parquet
file with the same columns works (`task.source.path=FILE`). The reference answer is the number
after `####`; the model's answer is taken after `</think>` (boxed, `####`, stated or plain) and
checked with math-verify.
"""

from distill.eval.extract import gsm8k_reference
from distill.eval.tasks import Source, Task, question_problems

MATH_PROMPT = "\nPlease reason step by step, and put your final answer within \\boxed{}."

TASK = Task(
    name="gsm8k",
    load=lambda source, cache_dir: question_problems(source, gsm8k_reference),
    source=Source(path="openai/gsm8k", subset="main", split="test", question_column="question",
                  answer_column="answer", prompt_suffix=MATH_PROMPT),
    max_new_tokens=4096,
)
