"""Your own problems as chat rows: a `messages` column (the prompt turns; a final assistant turn,
if present, is dropped) and an `answer` column, from a local file or the hub. Answers are taken
after `</think>` and checked with math-verify, like the math tasks."""

from eval.tasks import Problem, Source, Task, load_rows


def load(source, cache_dir) -> list[Problem]:
    problems = []
    for index, row in enumerate(load_rows(source)):
        messages = list(row[source.question_column])
        while messages and messages[-1]["role"] == "assistant":
            messages.pop()
        problems.append(Problem(id=str(row.get("id", index)),
                                messages=[{"role": m["role"], "content": m["content"]} for m in messages],
                                reference=str(row[source.answer_column]).strip()))
    return problems


TASK = Task(name="chat", load=load, source=Source(question_column="messages", answer_column="answer"))
