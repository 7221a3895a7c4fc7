"""Synthetic chat tasks with exact answers: offline data for fine-tuning, and the checkers that
score a reply (acornlm/eval/tasks.py runs the model on them; GRPO uses the checkers as rewards).

Interface (used by `acornlm data synth`, `acornlm eval tasks`, the SFT demo, and GRPO/DPO as
verifiable rewards and preference pairs):

    from acornlm.data.tasks import TASKS, make_examples, make_dataset, parse_tasks

    examples = make_examples("arithmetic", n=100, seed=0, split="train")   # deterministic
    examples[0].prompt, examples[0].answer      # "What is 37 + 45?", "82"
    examples[0].messages()                      # [{"role": "user", ...}, {"role": "assistant", ...}]
    TASKS["arithmetic"].check("82", "82")       # exact match (surrounding whitespace ignored)

Tasks: `arithmetic` (a + b, a - b with a, b < 100), `reverse` (reverse the order of 3-5 words),
`count` (how often a letter occurs in a word), `sort` (sort 3-5 numbers below 100) and `identity`
("who are you?" asked in many ways, one fixed answer): the group `en` (also `all`). In Chinese, the
group `zh`: `zh_identity` (你是谁？), `zh_arithmetic` (三十七加四十五等于多少？ -> 八十二) and `zh_poem`
(写一首题为《春晓》的五言绝句。 -> any poem of that form; its prompts and reference answers come from
a poetry corpus given to `use_poems`, see acornlm/data/poetry.py).

Held-out split: every task's problems are divided once and for all by a hash of the prompt, so
`split="heldout"` never produces a prompt that `split="train"` can produce, whatever the seeds.
Evaluation therefore measures answers to questions the model was not trained on.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from acornlm.data.poetry import poem_form
from acornlm.errors import ConfigError

SPLITS = ("train", "heldout")
HELDOUT_BUCKETS = 8  # one prompt in 8 (by hash) belongs to the held-out split
IDENTITY_ANSWER = "I am acornlm, a small language model trained from scratch."
ZH_IDENTITY_ANSWER = "我是 acornlm，一个从零开始训练的小语言模型。"
ZH_GREETINGS = ("", "你好！", "您好，", "嗨，", "早上好！")
ZH_IDENTITY_QUESTIONS = ("你是谁？", "你叫什么名字？", "请介绍一下你自己。", "你是什么？", "我在和谁说话？",
                         "你是人吗？", "你是哪个模型？", "说说你自己。")
ZH_DIGITS = "零一二三四五六七八九"

WORDS = ("apple bird boat bread cat cloud dog door fish frog gold green hat king lamp leaf light moon "
         "night rain red river road rose salt sand ship sky snow song star stone sun tree wind wolf").split()
LETTER_WORDS = ("apple banana berry bottle butter castle cherry coffee dinner garden letter lemon "
                "mirror orange pepper rabbit river silver summer sweet tomato winter yellow zebra").split()
GREETINGS = ("", "Hi! ", "Hello. ", "Hey, ", "Good morning! ")
IDENTITY_QUESTIONS = ("Who are you?", "What are you?", "What is your name?", "Introduce yourself.",
                      "Tell me about yourself.", "Who am I talking to?", "Are you a person?",
                      "Which model are you?")


@dataclass(frozen=True)
class TaskExample:
    """One question and its only correct answer."""

    task: str
    prompt: str
    answer: str

    def messages(self, with_answer: bool = True) -> list[dict[str, str]]:
        """The chat: the user's prompt, plus the assistant's answer when `with_answer`."""
        messages = [{"role": "user", "content": self.prompt}]
        if with_answer:
            messages.append({"role": "assistant", "content": self.answer})
        return messages


def exact_match(completion: str, answer: str) -> bool:
    """Exact-match accuracy's test: the reply equals the answer, ignoring surrounding whitespace."""
    return completion.strip() == answer.strip()


@dataclass(frozen=True)
class Task:
    """A generator of (prompt, answer) pairs from a random generator, and the answer checker."""

    name: str
    description: str
    make: Callable[[random.Random], tuple[str, str]]
    check: Callable[[str, str], bool] = exact_match


# --- the generators: each draws one problem from `rng` ---

def make_arithmetic(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randrange(100), rng.randrange(100)
    if rng.random() < 0.5:
        return f"What is {a} + {b}?", str(a + b)
    a, b = max(a, b), min(a, b)  # no negative results
    return f"What is {a} - {b}?", str(a - b)


def make_reverse(rng: random.Random) -> tuple[str, str]:
    words = [rng.choice(WORDS) for _ in range(rng.randint(3, 5))]
    return f"Reverse the words: {' '.join(words)}", " ".join(reversed(words))


def make_count(rng: random.Random) -> tuple[str, str]:
    word = rng.choice(LETTER_WORDS)
    # half the time a letter of the word, otherwise any letter (often a count of 0)
    letter = rng.choice(word) if rng.random() < 0.5 else rng.choice("abcdefghijklmnopqrstuvwxyz")
    return f'How many times does "{letter}" occur in "{word}"?', str(word.count(letter))


def make_sort(rng: random.Random) -> tuple[str, str]:
    numbers = [rng.randrange(100) for _ in range(rng.randint(3, 5))]
    return f"Sort: {' '.join(map(str, numbers))}", " ".join(map(str, sorted(numbers)))


def make_identity(rng: random.Random) -> tuple[str, str]:
    prompt = rng.choice(GREETINGS) + rng.choice(IDENTITY_QUESTIONS)
    return (prompt.lower() if rng.random() < 0.25 else prompt), IDENTITY_ANSWER


# --- in Chinese ---

def chinese_number(n: int) -> str:
    """0 <= n < 1000 in Chinese numerals: 7 -> 七, 10 -> 十, 45 -> 四十五, 105 -> 一百零五, 110 -> 一百一十."""
    if not 0 <= n < 1000:
        raise ConfigError(f"chinese_number covers 0..999, got {n}")
    if n < 10:
        return ZH_DIGITS[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return ("" if tens == 1 else ZH_DIGITS[tens]) + "十" + (ZH_DIGITS[ones] if ones else "")
    hundreds, rest = divmod(n, 100)
    if rest == 0:
        return ZH_DIGITS[hundreds] + "百"
    if rest < 10:
        return ZH_DIGITS[hundreds] + "百零" + ZH_DIGITS[rest]
    tens_part = chinese_number(rest)
    return ZH_DIGITS[hundreds] + "百" + (("一" + tens_part) if rest < 20 else tens_part)


def make_zh_arithmetic(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randrange(100), rng.randrange(100)
    if rng.random() < 0.5:
        return f"{chinese_number(a)}加{chinese_number(b)}等于多少？", chinese_number(a + b)
    a, b = max(a, b), min(a, b)
    return f"{chinese_number(a)}减{chinese_number(b)}等于多少？", chinese_number(a - b)


def make_zh_identity(rng: random.Random) -> tuple[str, str]:
    return rng.choice(ZH_GREETINGS) + rng.choice(ZH_IDENTITY_QUESTIONS), ZH_IDENTITY_ANSWER


POEMS: list[tuple[str, str, str]] = []  # (title, form, body) of the regular poems given to use_poems


def use_poems(poems: Iterable[tuple[str, str]]) -> int:
    """Give `zh_poem` its poems: (title, body) pairs, e.g. from the tang-poems corpus. Only poems of
    a regular form (4 or 8 lines of 5 or 7 characters) are kept; returns how many."""
    POEMS.clear()
    seen = set()
    for title, body in poems:
        form = poem_form(body)
        if form is not None and title and (title, form) not in seen:
            seen.add((title, form))
            POEMS.append((title, form, body.strip()))
    return len(POEMS)


def make_zh_poem(rng: random.Random) -> tuple[str, str]:
    if not POEMS:
        raise ConfigError("zh_poem needs poems: acornlm.data.tasks.use_poems(...) with a poetry corpus "
                          "(acornlm data fetch tang-poems), as `acornlm demo --corpus tang-poems` does")
    title, form, body = rng.choice(POEMS)
    return f"写一首题为《{title}》的{form}。", body


def poem_has_the_asked_form(completion: str, answer: str) -> bool:
    """Any poem of the form the reference answer has is right: the task asks for a form, not a text."""
    return poem_form(completion) is not None and poem_form(completion) == poem_form(answer)


TASKS: dict[str, Task] = {task.name: task for task in (
    Task("arithmetic", "add or subtract two numbers below 100", make_arithmetic),
    Task("reverse", "reverse the order of 3-5 words", make_reverse),
    Task("count", "count how often a letter occurs in a word", make_count),
    Task("sort", "sort 3-5 numbers below 100 in ascending order", make_sort),
    Task("identity", "say who the model is, however the question is asked", make_identity),
    Task("zh_identity", "say who the model is, asked in Chinese", make_zh_identity),
    Task("zh_arithmetic", "add or subtract two numbers below 100, in Chinese numerals", make_zh_arithmetic),
    Task("zh_poem", "write a poem of the asked form (五言/七言 绝句/律诗) for a title", make_zh_poem,
         poem_has_the_asked_form),
)}
GROUPS = {"all": ["arithmetic", "reverse", "count", "sort", "identity"],
          "en": ["arithmetic", "reverse", "count", "sort", "identity"],
          "zh": ["zh_identity", "zh_arithmetic", "zh_poem"]}


def parse_tasks(tasks: str | Sequence[str] | None) -> list[str]:
    """Task names from "a,b,c", a list, or a group: "all"/"en"/None (the English tasks) or "zh"
    (the Chinese ones); ConfigError naming the known ones."""
    if tasks is None:
        return list(GROUPS["all"])
    names = [name.strip() for name in (tasks.split(",") if isinstance(tasks, str) else tasks) if name.strip()]
    names = [task for name in names for task in GROUPS.get(name, [name])]
    unknown = [name for name in names if name not in TASKS]
    if unknown or not names:
        raise ConfigError(f"unknown task(s) {', '.join(unknown) or '(none given)'}: choose from "
                          f"{', '.join(TASKS)}, or a group: {', '.join(GROUPS)}")
    return list(dict.fromkeys(names))


def split_of(task: str, prompt: str) -> str:
    """The split a prompt belongs to, fixed by a hash of (task, prompt) so the splits never overlap."""
    digest = hashlib.sha256(f"{task}\x00{prompt}".encode()).digest()
    return "heldout" if digest[0] % HELDOUT_BUCKETS == 0 else "train"


def make_examples(task: str, n: int, seed: int = 0, split: str = "train") -> list[TaskExample]:
    """`n` examples of one task from one split, the same for the same (task, n, seed, split).

    Problems are drawn independently, so a small problem space (identity) repeats prompts.
    """
    if task not in TASKS:
        parse_tasks([task])  # raises with the list of known tasks
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}: choose one of {', '.join(SPLITS)}")
    if n < 0:
        raise ConfigError(f"the number of examples must be >= 0, got {n}")
    rng = random.Random(f"{task}/{seed}/{split}")  # string seeds are stable across runs and platforms
    examples = []
    draws = 0
    while len(examples) < n:
        prompt, answer = TASKS[task].make(rng)
        draws += 1
        if split_of(task, prompt) == split:
            examples.append(TaskExample(task, prompt, answer))
        elif draws > 1000 * (len(examples) + 1):  # a tiny problem space (few poems) may have no such prompt
            raise ConfigError(f"task {task} drew {draws} problems and found {len(examples)} of the {split} split; "
                              "give it more problems (e.g. more poems to use_poems)")
    return examples


def make_dataset(tasks: str | Sequence[str] | None, n: int, seed: int = 0, split: str = "train") -> list[TaskExample]:
    """`n` examples of each task, shuffled together (deterministically from `seed`)."""
    examples = [example for task in parse_tasks(tasks) for example in make_examples(task, n, seed, split)]
    random.Random(f"mix/{seed}/{split}").shuffle(examples)
    return examples


def write_jsonl(examples: Sequence[TaskExample], path: str | Path) -> Path:
    """Write examples as chat data in the messages format: {"messages": [...], "task": name} per line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for example in examples:
            f.write(json.dumps({"messages": example.messages(), "task": example.task}, ensure_ascii=False) + "\n")
    return path
