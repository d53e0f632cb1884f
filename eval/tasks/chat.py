"""Your own problems as chat rows: a `messages` column (the prompt turns; a final assistant turn,
if present, is dropped) and an `answer` column, from a local file or the hub. Answers are taken
after `</think>` and checked with math-verify, like the math tasks."""

from eval.tasks import Problem, Source, Task, load_rows


def load(source, cache_dir) -> list[Problem]:
    from distill.data import prompt_messages  # here: distill.data itself imports eval.tasks

    return [Problem(id=str(row.get("id", index)), messages=prompt_messages(row[source.question_column]),
                    reference=str(row[source.answer_column]).strip())
            for index, row in enumerate(load_rows(source))]


TASK = Task(name="chat", load=load, source=Source(question_column="messages", answer_column="answer"))
