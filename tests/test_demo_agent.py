"""`acornlm demo-agent` end to end on a tiny model: every stage runs, the figures are written, and the
figures are what the evaluation says (the real, 20-minute run's figures are in the README)."""

from __future__ import annotations

import json

import pytest
import torch

from acornlm.data.agent_tasks import make_agent_examples
from acornlm.data.chat import chat_text
from acornlm.eval.agent import evaluate_agent, first_call_checks, play

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_init(tmp_path_factory):
    from acornlm.model import ModelConfig, Transformer
    from acornlm.model.checkpoint import write_model_files
    from acornlm.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("demo-agent")
    texts = [chat_text(e.messages, tools=e.tools) for task in ("price", "add") for e in make_agent_examples(task, 40)]
    tokenizer = train_tokenizer(texts, kind="bpe", vocab_size=400)
    tokenizer.save(root / "tok")
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, max_position_embeddings=512)
    (root / "init").mkdir()
    write_model_files(root / "init", Transformer(config), {"stage": "test"}, tokenizer_dir=root / "tok")
    return root / "init"


def test_demo_agent_runs_every_stage_and_writes_its_figures(tiny_init, tmp_path, capsys):
    from acornlm.cli import main

    out = tmp_path / "demo"
    main(["demo-agent", "--out", str(out), "--minutes", "0.3", "--init", str(tiny_init), "--eval_examples", "2"])
    figures = json.loads((out / "figures.json").read_text())
    for stage in ("before", "sft", "grpo"):
        assert set(figures[stage]["price"]) >= {"n", "tool_call_valid", "tool_call_right", "accuracy"}
        assert set(figures[stage]["add"]) >= {"accuracy_thinking", "accuracy_no_thinking"}
        assert figures[stage]["price"]["n"] == 2
    assert figures["reward_model"]["steps"] >= 1
    assert set(figures["rlhf"]) == {"ppo", "grpo"} and all(run["steps"] >= 1 for run in figures["rlhf"].values())
    summary = (out / "summary.md").read_text()
    assert "after agentic GRPO" in summary and "| PPO |" in summary and "| GRPO |" in summary
    assert summary in capsys.readouterr().out
    for run in ("sft", "grpo", "reward", "ppo", "grpo-rm"):
        assert (out / run / "metrics.jsonl").is_file()


def test_evaluation_counts_a_scripted_perfect_tool_user(tmp_path):
    """A policy that calls the tool right and repeats its answer scores 1 on every price figure."""
    from scripted_policy import ScriptedPolicy

    from acornlm.tokenizer import train_tokenizer

    examples = make_agent_examples("price", 30, seed=0)
    tokenizer = train_tokenizer([chat_text(e.messages, tools=e.tools) for e in examples], "bpe", 400)
    records = {e.prompt: e.record() for e in make_agent_examples("price", 3, seed=0, split="heldout")}

    def script(text: str) -> str:
        if "</tool_response>" in text:
            return text.split("<tool_response>\n")[-1].split("\n</tool_response>")[0] + " coins."
        question = text.split("<|im_start|>user\n")[-1].split("<|im_end|>")[0]
        item = records[question]["item"]
        return f'<tool_call>\n{{"name": "price", "arguments": {{"item": "{item}"}}}}\n</tool_call>'

    policy = ScriptedPolicy(tokenizer, script)
    for record in records.values():
        trajectory = play(policy, tokenizer, record, max_new_tokens=48)
        assert first_call_checks(record, trajectory) == (True, True)
    figures = evaluate_agent(policy, tokenizer, ["price"], n=3)["price"]
    assert (figures["tool_call_valid"], figures["tool_call_right"], figures["accuracy"]) == (1.0, 1.0, 1.0)


def test_eval_agent_command_writes_its_figures_and_refuses_bad_input(tiny_init, tmp_path, capsys):
    from acornlm.cli import main
    from acornlm.cli.demo_agent import demo_agent
    from acornlm.cli.evaluate import agent
    from acornlm.errors import ConfigError

    out = tmp_path / "agent.json"
    main(["eval", "agent", "--ckpt", str(tiny_init), "--n", "1", "--out", str(out)])
    figures = json.loads(out.read_text())
    assert figures["price"]["n"] == 1 and "accuracy_thinking" in figures["add"]
    assert json.loads(capsys.readouterr().out) == figures
    with pytest.raises(ConfigError, match="needs tasks among price, add"):
        agent(ckpt=str(tiny_init), tasks="juggle", n=1)
    with pytest.raises(ConfigError, match="--ckpt is required"):
        agent(ckpt=None)
    with pytest.raises(ConfigError, match="--minutes must be > 0"):
        demo_agent(out=str(tmp_path / "d"), minutes=0)
