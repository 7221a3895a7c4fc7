"""Evaluation: the model on the synthetic chat tasks of acornlm/data/tasks.py, scored by exact match.

    from acornlm.eval import TASKS, make_examples, evaluate_tasks
    accuracy = evaluate_tasks(acornlm.load("runs/sft"), "arithmetic,reverse", n=50, seed=0)
"""

from acornlm.data.tasks import TASKS, Task, TaskExample, make_dataset, make_examples, parse_tasks
from acornlm.eval.tasks import evaluate_tasks

__all__ = ["TASKS", "Task", "TaskExample", "evaluate_tasks", "make_dataset", "make_examples", "parse_tasks"]
