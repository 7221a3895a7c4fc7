"""Synthetic chat tasks with exact answers: offline data for fine-tuning and a score that shows it helped.

Interface (used by `acornlm data synth`, `acornlm eval tasks`, the SFT demo, and GRPO/DPO as
verifiable rewards and preference pairs):

    from acornlm.eval.tasks import TASKS, make_examples, make_dataset, evaluate_tasks, parse_tasks

    examples = make_examples("arithmetic", n=100, seed=0, split="train")   # deterministic
    examples[0].prompt, examples[0].answer      # "What is 37 + 45?", "82"
    examples[0].messages()                      # [{"role": "user", ...}, {"role": "assistant", ...}]
    TASKS["arithmetic"].check("82", "82")       # exact match (surrounding whitespace ignored)
    accuracy = evaluate_tasks(lm, ["arithmetic", "reverse"], n=50, seed=0)   # {"arithmetic": 0.3, ...}

Tasks: `arithmetic` (a + b, a - b with a, b < 100), `reverse` (reverse the order of 3-5 words),
`count` (how often a letter occurs in a word), `sort` (sort 3-5 numbers below 100) and `identity`
("who are you?" asked in many ways, one fixed answer).

Held-out split: every task's problems are divided once and for all by a hash of the prompt, so
`split="heldout"` never produces a prompt that `split="train"` can produce, whatever the seeds.
Evaluation therefore measures answers to questions the model was not trained on.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from acornlm.errors import ConfigError

if TYPE_CHECKING:
    from acornlm.infer.api import LanguageModel

SPLITS = ("train", "heldout")
HELDOUT_BUCKETS = 8  # one prompt in 8 (by hash) belongs to the held-out split
IDENTITY_ANSWER = "I am acornlm, a small language model trained from scratch."

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


TASKS: dict[str, Task] = {task.name: task for task in (
    Task("arithmetic", "add or subtract two numbers below 100", make_arithmetic),
    Task("reverse", "reverse the order of 3-5 words", make_reverse),
    Task("count", "count how often a letter occurs in a word", make_count),
    Task("sort", "sort 3-5 numbers below 100 in ascending order", make_sort),
    Task("identity", "say who the model is, however the question is asked", make_identity),
)}


def parse_tasks(tasks: str | Sequence[str] | None) -> list[str]:
    """Task names from "a,b,c", a list, or "all"/None (every task); ConfigError naming the known ones."""
    if tasks is None or tasks == "all" or tasks == ["all"]:
        return list(TASKS)
    names = [name.strip() for name in (tasks.split(",") if isinstance(tasks, str) else tasks) if name.strip()]
    unknown = [name for name in names if name not in TASKS]
    if unknown or not names:
        raise ConfigError(f"unknown task(s) {', '.join(unknown) or '(none given)'}: choose from "
                          f"{', '.join(TASKS)} or all")
    return names


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
    while len(examples) < n:
        prompt, answer = TASKS[task].make(rng)
        if split_of(task, prompt) == split:
            examples.append(TaskExample(task, prompt, answer))
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


# --- evaluation ---

STOP_IDS = (0, 2)  # <|endoftext|> and <|im_end|> (fixed ids in every acornlm tokenizer) end a reply


def reply(lm: LanguageModel, prompt: str, max_new_tokens: int = 64) -> str:
    """The model's greedy reply to one user message, rendered with the chat template.

    Generation stops at <|im_end|> (the end of an assistant turn) or <|endoftext|>.
    """
    from acornlm.data.chat import render_prompt
    from acornlm.infer.generate import generate_tokens
    from acornlm.infer.sampling import SamplingParams

    prompt_ids = render_prompt(lm.tokenizer, [{"role": "user", "content": prompt}])
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    tokens = list(generate_tokens(lm.model, prompt_ids, params, eos_ids=STOP_IDS, vocab_size=lm.tokenizer.vocab_size))
    return lm.tokenizer.decode(tokens)


def replies(lm: LanguageModel, prompts: Sequence[str], max_new_tokens: Sequence[int]) -> list[str]:
    """Greedy replies to many user messages: what `reply` gives for each, decoded in batches.

    Prompts whose rendered ids have the same length share one batch (no padding needed): one
    prefill, then one forward pass per new token for all of them. Much faster than one at a time.
    """
    import torch

    from acornlm.data.chat import render_prompt
    from acornlm.infer.generate import fit_prompt_to_context, new_token_budget

    model, tokenizer = lm.model, lm.tokenizer
    context = model.config.max_position_embeddings
    ids = [fit_prompt_to_context(render_prompt(tokenizer, [{"role": "user", "content": p}]), context)
           for p in prompts]
    groups: dict[int, list[int]] = {}
    for index, prompt_ids in enumerate(ids):
        groups.setdefault(len(prompt_ids), []).append(index)
    texts = [""] * len(prompts)
    device = model.device
    with torch.inference_mode():
        for length, members in groups.items():
            budgets = [new_token_budget(length, max_new_tokens[i], context) for i in members]
            steps = max(budgets)
            if steps == 0:
                continue
            cache = model.new_cache(len(members), length + steps - 1)
            batch = torch.tensor([ids[i] for i in members], dtype=torch.long, device=device)
            logits = model(batch, cache)[:, -1, :tokenizer.vocab_size]
            generated: list[list[int]] = [[] for _ in members]
            done = [budget == 0 for budget in budgets]
            for step in range(steps):
                next_ids = logits.argmax(dim=-1)
                for row, token in enumerate(next_ids.tolist()):
                    if done[row]:
                        continue
                    if token in STOP_IDS:
                        done[row] = True
                    else:
                        generated[row].append(token)
                        done[row] = len(generated[row]) >= budgets[row]
                if all(done) or step == steps - 1:
                    break
                logits = model(next_ids[:, None], cache)[:, -1, :tokenizer.vocab_size]
            for row, index in enumerate(members):
                texts[index] = tokenizer.decode(generated[row])
    return texts


def evaluate_tasks(lm: LanguageModel, tasks: str | Sequence[str] | None = None, n: int = 50, seed: int = 0,
                   split: str = "heldout", samples: dict[str, list[tuple[str, str, str]]] | None = None
                   ) -> dict[str, float]:
    """Exact-match accuracy per task on `n` held-out examples, answering greedily with the chat template.

    `samples`, when given, receives (prompt, expected, reply) triples per task for display.
    A reply may run for the answer's length plus 16 tokens: longer is wrong anyway.
    """
    accuracy = {}
    for task in parse_tasks(tasks):
        examples = make_examples(task, n, seed, split)
        budgets = [len(lm.tokenizer.encode(example.answer)) + 16 for example in examples]
        texts = replies(lm, [example.prompt for example in examples], budgets)
        correct = sum(TASKS[task].check(text, example.answer) for text, example in zip(texts, examples))
        if samples is not None:
            samples[task] = [(example.prompt, example.answer, text) for example, text in zip(examples, texts)]
        accuracy[task] = correct / n if n else 0.0
    return accuracy
