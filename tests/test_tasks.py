"""Synthetic tasks: deterministic generators, correct answers, disjoint held-out split, scoring."""

from __future__ import annotations

import re

import pytest
import torch

from acornlm.data.conversations import load_conversations
from acornlm.data.tasks import (
    GROUPS,
    IDENTITY_ANSWER,
    TASKS,
    exact_match,
    make_dataset,
    make_examples,
    parse_tasks,
    split_of,
    write_jsonl,
)
from acornlm.errors import ConfigError
from acornlm.eval import tasks as task_module
from acornlm.eval.tasks import evaluate_tasks


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models decode faster on one thread, and far faster when other processes share the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


GENERATED = [task for task in TASKS if task != "zh_poem"]  # zh_poem draws from use_poems' poems (test_tasks_zh.py)


def test_generators_are_deterministic_from_the_seed():
    for task in GENERATED:
        assert make_examples(task, 30, seed=3) == make_examples(task, 30, seed=3)
        if task not in ("identity", "zh_identity"):
            assert make_examples(task, 30, seed=3) != make_examples(task, 30, seed=4)
    assert make_dataset("all", 10, seed=1) == make_dataset("all", 10, seed=1)
    assert sorted({e.task for e in make_dataset("all", 10, seed=1)}) == sorted(GROUPS["all"])


def test_answers_are_correct():
    for example in make_examples("arithmetic", 200, seed=0):
        a, op, b = re.fullmatch(r"What is (\d+) ([+-]) (\d+)\?", example.prompt).groups()
        assert int(example.answer) == (int(a) + int(b) if op == "+" else int(a) - int(b)) >= 0
    for example in make_examples("reverse", 100, seed=0):
        words = example.prompt.removeprefix("Reverse the words: ").split()
        assert 3 <= len(words) <= 5 and example.answer.split() == words[::-1]
    for example in make_examples("count", 200, seed=0):
        letter, word = re.fullmatch(r'How many times does "(.)" occur in "(\w+)"\?', example.prompt).groups()
        assert example.answer == str(word.count(letter))
    assert {e.answer for e in make_examples("count", 200, seed=0)} >= {"0", "1", "2"}
    for example in make_examples("sort", 100, seed=0):
        numbers = [int(x) for x in example.prompt.removeprefix("Sort: ").split()]
        assert [int(x) for x in example.answer.split()] == sorted(numbers)
    assert {e.answer for e in make_examples("identity", 50, seed=0)} == {IDENTITY_ANSWER}


def test_held_out_prompts_never_appear_in_training_data():
    for task in GENERATED:
        train = {e.prompt for e in make_examples(task, 2000, seed=0, split="train")}
        heldout = {e.prompt for e in make_examples(task, 300, seed=1, split="heldout")}
        assert heldout and not train & heldout, task
        assert all(split_of(task, prompt) == "heldout" for prompt in heldout)
    # the split is a property of the prompt, not of the seed
    assert {e.prompt for e in make_examples("arithmetic", 300, seed=5, split="heldout")} & \
        {e.prompt for e in make_examples("arithmetic", 300, seed=6, split="heldout")}


def test_exact_match_checker():
    assert exact_match(" 42\n", "42")
    assert not exact_match("42.", "42")
    assert not exact_match("4", "42")
    assert TASKS["sort"].check("1 2 3", "1 2 3") and not TASKS["sort"].check("1 3 2", "1 2 3")


def test_task_names_are_validated():
    assert parse_tasks("all") == GROUPS["all"] == [task for task in TASKS if not task.startswith("zh_")]
    assert parse_tasks("sort, reverse") == ["sort", "reverse"]
    with pytest.raises(ConfigError, match="unknown task.*choose from arithmetic"):
        parse_tasks("arithmetic,poetry")
    with pytest.raises(ConfigError, match="unknown split"):
        make_examples("sort", 3, split="test")


def test_written_dataset_loads_as_chat_data(tmp_path):
    examples = make_dataset("arithmetic,identity", 5, seed=0)
    path = write_jsonl(examples, tmp_path / "tasks.jsonl")
    conversations, stats = load_conversations(path)
    assert stats.formats == {str(path): "messages"}
    assert [c.messages for c in conversations] == [e.messages() for e in examples]


def test_evaluate_tasks_scores_exact_matches(monkeypatch):
    """The scoring loop, with a stand-in model that answers arithmetic and sort right, the rest wrong."""
    answers = {e.prompt: e.answer for task in GENERATED for e in make_examples(task, 20, seed=7, split="heldout")}
    calls = []

    def fake_replies(lm, prompts, max_new_tokens):
        calls.extend(prompts)
        return [" " + answers[p] + "\n" if p.startswith(("What is", "Sort")) else answers[p] + "!" for p in prompts]

    monkeypatch.setattr(task_module, "replies", fake_replies)

    class FakeTokenizer:
        def encode(self, text):
            return list(text)

    class FakeLM:
        tokenizer = FakeTokenizer()

    samples = {}
    accuracy = evaluate_tasks(FakeLM(), "all", n=20, seed=7, samples=samples)
    assert accuracy == {"arithmetic": 1.0, "reverse": 0.0, "count": 0.0, "sort": 1.0, "identity": 0.0}
    assert len(calls) == 100 and set(calls) <= set(answers)
    assert len(samples["sort"]) == 20


def test_batched_replies_equal_one_at_a_time_generation():
    """`replies` (batched by prompt length) gives what greedy generation gives for each prompt alone."""
    from acornlm.data.chat import chat_text, render_prompt
    from acornlm.infer.api import LanguageModel
    from acornlm.model import ModelConfig, Transformer
    from acornlm.tokenizer import train_tokenizer

    examples = make_dataset("arithmetic,identity", 6, seed=0, split="heldout")
    tokenizer = train_tokenizer([chat_text(e.messages()) for e in make_dataset("all", 50, seed=0)],
                                kind="bpe", vocab_size=300)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64))
    lm = LanguageModel(model, tokenizer)
    prompts = [e.prompt for e in examples]
    budgets = [3 + i for i in range(len(prompts))]
    batched = task_module.replies(lm, prompts, budgets)
    assert batched == [task_module.reply(lm, p, b) for p, b in zip(prompts, budgets)]
    lengths = [len(render_prompt(tokenizer, e.messages(with_answer=False))) for e in examples]
    assert len(set(lengths)) < len(lengths)  # some prompts really were decoded together
