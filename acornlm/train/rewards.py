"""GRPO's reward functions: the built-in `task` reward and user functions loaded from a module or a
file, called so that a function that fails scores 0 instead of stopping training.

    functions, names = load_reward_functions("task, my_rewards.py:score")
    runner = RewardRunner(functions, names)
    runner.score(completion_text, prompt_record)   # the sum of the functions' rewards
"""

from __future__ import annotations

import importlib.util
import math
import traceback
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from acornlm.data.agent_tasks import AGENT_TASKS, agent_task_reward
from acornlm.data.tasks import TASKS
from acornlm.errors import ConfigError

# A reward function scores one completion: reward(completion, example) -> float. `example` is
# the prompt's record (its "prompt", and whatever else the data holds: "answer", "task", ...).
RewardFunction = Callable[[str, dict[str, Any]], float]


@dataclass
class RewardRunner:
    """Calls the reward functions and sums their scores, surviving functions that fail.

    A function that raises (or returns something that is not a finite number) scores 0 for
    that completion; training goes on. Each failing function is reported once, with its first
    error, as a warning, and every failure is counted (`errors`, logged as `reward_errors`).
    """

    functions: Sequence[RewardFunction]
    names: Sequence[str] = ()
    errors: int = 0
    errors_by_function: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.functions:
            raise ConfigError("GRPO needs at least one reward function")
        if not self.names:
            self.names = [getattr(fn, "__name__", repr(fn)) for fn in self.functions]

    def score(self, completion: str, example: dict[str, Any]) -> float:
        """The sum of every function's reward for one completion."""
        return sum(self._call(name, fn, completion, example) for name, fn in zip(self.names, self.functions))

    def _call(self, name: str, fn: RewardFunction, completion: str, example: dict[str, Any]) -> float:
        try:
            value = fn(completion, example)
            if isinstance(value, bool):
                value = float(value)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise TypeError(f"returned {value!r}; a reward must be a finite number")
            return float(value)
        except Exception as exc:  # noqa: BLE001 - any user error: score 0, count it, go on
            self._record_error(name, exc)
            return 0.0

    def _record_error(self, name: str, exc: Exception) -> None:
        self.errors += 1
        first = name not in self.errors_by_function
        self.errors_by_function[name] = self.errors_by_function.get(name, 0) + 1
        if first:
            where = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
            location = f" ({where.filename}:{where.lineno})" if where else ""
            warnings.warn(
                f"reward function {name!r} raised {type(exc).__name__}: {exc}{location}; the completion "
                "scores 0 for it and training continues (further errors are only counted, see "
                "reward_errors in metrics.jsonl)", RuntimeWarning, stacklevel=2)


def task_reward(completion: str, example: dict[str, Any]) -> float:
    """The verifiable reward of acornlm.data.tasks: 1 when the task's checker accepts the answer, else 0."""
    task, answer = example.get("task"), example.get("answer")
    if task in AGENT_TASKS and isinstance(answer, str):  # the tool and thinking tasks: the final answer's number
        return agent_task_reward(completion, example)
    if task not in TASKS or not isinstance(answer, str):
        raise ValueError(f"the `task` reward needs a known `task` ({', '.join([*TASKS, *AGENT_TASKS])}) and an "
                         f"`answer` string in each prompt record; got task={task!r}, answer={answer!r}")
    return float(TASKS[task].check(completion, answer))


BUILTIN_REWARDS: dict[str, RewardFunction] = {"task": task_reward}


def load_reward_functions(spec: str) -> tuple[list[RewardFunction], list[str]]:
    """Reward functions from a comma-separated spec; their rewards are summed.

    Each item is `task` (the checkers of acornlm.data.tasks), `package.module:function` or
    `path/to/file.py:function`. A function takes (completion text, prompt record) and returns a number.
    """
    functions, names = [], []
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        if item in BUILTIN_REWARDS:
            functions.append(BUILTIN_REWARDS[item])
        elif ":" in item:
            functions.append(import_function(*item.rsplit(":", 1)))
        else:
            raise ConfigError(f"reward {item!r} is neither a built-in reward ({', '.join(BUILTIN_REWARDS)}) nor "
                              "`module:function` / `file.py:function`")
        names.append(item)
    if not functions:
        raise ConfigError("--reward is empty: name at least one reward, e.g. task or my_rewards.py:score")
    return functions, names


def import_function(source: str, name: str) -> RewardFunction:
    """`name` from a Python file (`path.py`) or an importable module; ConfigError saying what is missing."""
    try:
        if source.endswith(".py"):
            path = Path(source)
            if not path.is_file():
                raise ConfigError(f"reward file {path} does not exist")
            spec = importlib.util.spec_from_file_location(f"acornlm_reward_{path.stem}", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(source)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - any import-time failure of user code
        raise ConfigError(f"cannot import reward module {source!r}: {type(exc).__name__}: {exc}") from exc
    function = getattr(module, name, None)
    if not callable(function):
        raise ConfigError(f"{source} has no function {name!r} to use as a reward")
    return function
