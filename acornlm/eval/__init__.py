"""Evaluation: synthetic chat tasks with exact-match checkers (see `tasks.py`).

    from acornlm.eval import TASKS, make_examples, evaluate_tasks
    accuracy = evaluate_tasks(acornlm.load("runs/sft"), "arithmetic,reverse", n=50, seed=0)
"""

from acornlm.eval.tasks import (
    TASKS,
    Task,
    TaskExample,
    evaluate_tasks,
    make_dataset,
    make_examples,
    parse_tasks,
)

__all__ = ["TASKS", "Task", "TaskExample", "evaluate_tasks", "make_dataset", "make_examples", "parse_tasks"]
