"""Your own problems as chat rows: a `messages` column (the prompt turns; a final assistant turn,
if present, is dropped) and an `answer` column, from a local file or the hub. Answers are taken
after `</think>` and checked with math-verify, like the math tasks."""

from distill.eval.tasks import Problem, Source, Task, load_rows
from distill.students.chat import prompt_messages


def load(source, cache_dir) -> list[Problem]:
    return [Problem(id=str(row.get("id", index)), messages=prompt_messages(row[source.question_column]),
                    reference=str(row[source.answer_column]).strip())
            for index, row in enumerate(load_rows(source))]


TASK = Task(name="chat", load=load, source=Source(question_column="messages", answer_column="answer"))
