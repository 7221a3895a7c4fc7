"""Agentic RL: GRPO and PPO play prompts that carry tools out over several turns (the tools run,
their results are appended), reward the final answer and train only the tokens the model sampled;
thinking prompts are rewarded on the answer after the think block."""

from __future__ import annotations

import json

import pytest
import torch
from scripted_policy import ScriptedPolicy

from acornlm.data.agent_tasks import PRICE_TOOL, make_agent_examples, price_tool
from acornlm.data.chat import chat_text
from acornlm.errors import ConfigError
from acornlm.train.rewards import RewardRunner, task_reward
from acornlm.train.rollouts import ToolEnvironment, answer_text, tool_environment

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer():
    from acornlm.tokenizer import train_tokenizer

    texts = [chat_text(e.messages, tools=e.tools) for task in ("price", "add")
             for e in make_agent_examples(task, 40, seed=0)]
    return train_tokenizer(texts, kind="bpe", vocab_size=400)


def call(item: str) -> str:
    return f'<tool_call>\n{{"name": "price", "arguments": {{"item": "{item}"}}}}\n</tool_call>'


def test_a_group_is_played_with_the_tool_and_rewarded_on_its_final_answer(tokenizer):
    from acornlm.train.grpo import GRPOBatches, group_advantages

    records = [e.record() for e in make_agent_examples("price", 3, seed=0)]

    def script(text: str):
        if "</tool_response>" not in text:  # turn 1: the right call or a wrong item, sampled
            return [call(records[0]["item"]), "Hm, I guess 5 coins."]
        return text.split("<tool_response>\n")[-1].split("\n</tool_response>")[0] + " coins."  # repeat the tool

    policy = ScriptedPolicy(tokenizer, script)
    batches = GRPOBatches(policy, tokenizer, records[:1], records[1:], RewardRunner([task_reward]), group_size=8,
                          batch_size=1, max_new_tokens=48, temperature=1.0, seed=0,
                          environment=ToolEnvironment({"price": price_tool}))
    batch = batches.batch(0, 0)
    price = records[0]["table"][records[0]["item"]]
    called = batch["valid_calls"].item()
    assert 0 < called < 8  # both branches were sampled
    assert batch["rewards"].sum().item() == called  # a call gives the right price; the guess does not
    assert torch.allclose(batch["advantages"], group_advantages(batch["rewards"], 8))
    assert batch["tool_calls"].item() == called and batch["tool_errors"].item() == 0
    for row in range(8):  # trained tokens: the model's turns only, never the tool's response
        trained = tokenizer.decode(batch["targets"][row][batch["mask"][row].bool()].tolist())
        assert "<tool_response>" not in trained and str(price) + " coins." not in trained.split("</tool_call>")[0]
        if batch["rewards"][row] == 1:
            assert trained.startswith("<tool_call>") and trained.endswith(f"{price} coins.<|im_end|>")


def test_prompts_with_tools_need_an_environment(tokenizer):
    from acornlm.train.rollouts import Rollouts

    records = [e.record() for e in make_agent_examples("price", 2, seed=0)]
    with pytest.raises(ConfigError, match="carry tools but no function runs them: give --tools"):
        Rollouts(ScriptedPolicy(tokenizer, lambda text: ""), tokenizer, records, records,
                 RewardRunner([task_reward]), num_samples=2, batch_size=1, max_new_tokens=8, temperature=1.0)


def test_tool_environment_collects_builtin_and_user_tools(tmp_path):
    assert tool_environment(None, "arithmetic", 3, 2.0) is None
    assert set(tool_environment(None, "arithmetic,price", 3, 2.0).functions) == {"price"}
    tools = tmp_path / "my_tools.py"
    tools.write_text("def weather(city: str) -> str:\n    '''Weather of a city.'''\n    return 'sunny'\n")
    environment = tool_environment(tools, None, 2, 0.5)
    assert set(environment.functions) == {"weather"} and environment.max_turns == 2
    with pytest.raises(ConfigError, match="max_turns"):
        tool_environment(tools, None, 0, 0.5)


def test_a_thinking_prompt_is_rewarded_on_the_answer_after_the_think_block():
    record = make_agent_examples("add", 1, seed=0)[0].record()
    answer = record["answer"]
    text = f"7 + 6 = 13, write 3\nso 999\n</think>\n\n{answer}"
    assert answer_text(text, record) == answer
    assert task_reward(answer_text(text, record), record) == 1.0
    assert task_reward(answer_text(f"so {answer}\n</think>\n\n1", record), record) == 0.0
    assert answer_text("42", {"answer": "42"}) == "42"  # no thinking asked: the text as it is


def test_grpo_and_ppo_cli_run_agentic_tasks_end_to_end(tokenizer, tmp_path):
    from acornlm.cli.align import grpo, ppo
    from acornlm.model import ModelConfig, Transformer
    from acornlm.model.checkpoint import read_checkpoint_config, resolve_checkpoint, write_model_files
    from acornlm.train.config import TrainConfig
    from acornlm.train.grpo import GRPOConfig
    from acornlm.train.ppo import PPOConfig

    init = tmp_path / "init"
    init.mkdir()
    tokenizer.save(tmp_path / "tok")
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, max_position_embeddings=512)
    write_model_files(init, Transformer(config), {"stage": "test"}, tokenizer_dir=tmp_path / "tok")
    train = TrainConfig(max_steps=2, batch_size=2, seq_len=384, learning_rate=1e-3, warmup_steps=1, eval_interval=2,
                        eval_batches=1, save_interval=0, log_interval=1, progress=False)
    grpo(init=str(init), out=str(tmp_path / "grpo"), tasks="price,add", num_prompts=8, train=train,
         grpo=GRPOConfig(group_size=2, max_new_tokens=12, max_turns=2, tool_timeout=1.0))
    ppo(init=str(init), out=str(tmp_path / "ppo"), tasks="price,add", num_prompts=8, train=train,
        ppo=PPOConfig(num_samples=2, max_new_tokens=12, max_turns=2, tool_timeout=1.0))
    for stage in ("grpo", "ppo"):
        records = [json.loads(line) for line in (tmp_path / stage / "metrics.jsonl").read_text().splitlines()]
        assert all("tool_calls" in r for r in records if "reward" in r)
        assert "val_task_accuracy" in records[-1]
        info = read_checkpoint_config(resolve_checkpoint(tmp_path / stage))
        assert info[stage]["max_turns"] == 2


def test_price_tool_schema_is_what_the_prompt_shows():
    record = make_agent_examples("price", 1, seed=0)[0].record()
    assert record["tools"] == [PRICE_TOOL] and price_tool(record["item"], example=record).isdigit()
