"""GRPO: group-normalised advantages, the clipped loss and KL estimate, reward errors, the stage."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from acornlm.train.grpo import GRPOConfig, group_advantages, grpo_loss
from acornlm.train.losses import kl_k3
from acornlm.train.rewards import RewardRunner


def test_advantages_are_normalised_within_each_group():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 5.0, 5.0, 5.0, 5.0, 0.0, 2.0, 4.0, 6.0])
    advantages = group_advantages(rewards, group_size=4, eps=1e-6)
    for g in range(3):
        group = rewards[4 * g: 4 * g + 4].tolist()
        expected = [(r - statistics.mean(group)) / (statistics.stdev(group) + 1e-6) for r in group]
        assert advantages[4 * g: 4 * g + 4].tolist() == pytest.approx(expected, abs=1e-5)
    assert advantages[4:8].abs().max() == 0  # all equal: no signal
    assert advantages[0:4].sum().abs() < 1e-6 and advantages[8:].sum().abs() < 1e-5  # mean 0 per group
    # the scale of the rewards does not matter, only their order within the group
    assert group_advantages(rewards * 10 + 3, 4, eps=1e-9).tolist() == pytest.approx(
        group_advantages(rewards, 4, eps=1e-9).tolist(), abs=1e-5)


def test_kl_k3_matches_formula_and_is_never_negative():
    logp = torch.tensor([-1.0, -2.0, -0.5])
    ref = torch.tensor([-1.5, -2.0, -0.1])
    expected = [math.exp(r - p) - (r - p) - 1 for p, r in zip(logp.tolist(), ref.tolist())]
    assert kl_k3(logp, ref).tolist() == pytest.approx(expected)
    assert kl_k3(logp, ref)[1] == 0 and (kl_k3(logp, ref) >= 0).all()


def test_grpo_loss_equals_hand_computation_with_clipping_and_kl():
    logprobs = torch.tensor([[-1.0, -1.0, 0.0], [-2.0, -0.5, -0.5]])
    old = torch.tensor([[-1.5, -1.0, 0.0], [-2.0, -0.2, -0.5]])
    ref = torch.tensor([[-1.0, -1.2, 0.0], [-2.0, -0.5, -0.4]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    advantages = torch.tensor([1.0, -1.0])
    eps, beta = 0.2, 0.05

    def term(p, o, r, a):
        ratio = math.exp(p - o)
        surrogate = min(ratio * a, min(max(ratio, 1 - eps), 1 + eps) * a)
        return surrogate - beta * (math.exp(r - p) - (r - p) - 1)

    per_completion = []
    for i in range(2):
        terms = [term(logprobs[i, t].item(), old[i, t].item(), ref[i, t].item(), advantages[i].item())
                 for t in range(3) if mask[i, t]]
        per_completion.append(sum(terms) / len(terms))
    out = grpo_loss(logprobs, old, advantages, mask, clip_eps=eps, reference_logprobs=ref, kl_beta=beta)
    assert out.loss.item() == pytest.approx(-sum(per_completion) / 2, rel=1e-6)
    # ratio e^0.5 with A=+1 is clipped at 1.2; ratio e^-0.3 with A=-1 is clipped at 0.8
    assert out.clipped_fraction.item() == pytest.approx(2 / 5)
    assert out.kl.item() > 0


def test_grpo_gradient_follows_the_advantage_when_policy_is_old_policy():
    logprobs = torch.tensor([[-1.0, -1.0], [-1.0, -1.0]], requires_grad=True)
    out = grpo_loss(logprobs, logprobs.detach(), torch.tensor([1.0, -1.0]), torch.ones(2, 2))
    out.loss.backward()
    assert out.loss.item() == pytest.approx(0.0)  # ratio 1, advantages sum to 0
    assert (logprobs.grad[0] < 0).all() and (logprobs.grad[1] > 0).all()  # better sample up, worse down


# --- rewards ---

def exact(completion, example):
    return float(completion.strip() == example["answer"])


def broken(completion, example):
    return 1 / 0


def test_reward_runner_sums_functions():
    runner = RewardRunner([exact, lambda c, e: 0.5 * len(c)])
    assert runner.score("4", {"answer": "4"}) == pytest.approx(1.5)
    assert runner.score(" 5", {"answer": "4"}) == pytest.approx(1.0)
    assert runner.errors == 0


def test_failing_reward_scores_zero_is_counted_and_shown_once():
    runner = RewardRunner([exact, broken, lambda c, e: float("nan"), lambda c, e: "yes"],
                          names=["exact", "broken", "nan", "text"])
    with pytest.warns(RuntimeWarning) as caught:
        scores = [runner.score("4", {"answer": "4"}) for _ in range(3)]
    assert scores == [1.0, 1.0, 1.0]  # only the working function counts
    assert runner.errors == 9
    assert runner.errors_by_function == {"broken": 3, "nan": 3, "text": 3}
    messages = [str(w.message) for w in caught]
    assert len(messages) == 3  # one warning per failing function, not per call
    assert "ZeroDivisionError" in messages[0] and "training continues" in messages[0]
    assert "finite number" in messages[1]


# --- the stage on a tiny model ---

def write_tiny_checkpoint(directory, seed: int = 0):
    """A tiny random 'pretrained' checkpoint with a BPE tokenizer trained on the synthetic tasks' chats."""
    from acornlm.data.chat import chat_text
    from acornlm.data.tasks import make_dataset
    from acornlm.model import ModelConfig, Transformer
    from acornlm.model.checkpoint import write_model_files
    from acornlm.tokenizer import train_tokenizer

    directory.mkdir(parents=True)
    texts = [chat_text(example.messages()) for example in make_dataset("all", 100, seed=0)]
    tokenizer = train_tokenizer(texts, kind="bpe", vocab_size=300)
    tokenizer.save(directory / "tokenizer-source")
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=96, rope_theta=10000.0)
    write_model_files(directory, Transformer(config), {"stage": "test"}, tokenizer_dir=directory / "tokenizer-source")
    return directory


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("grpo") / "init")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is fastest, and the cores are shared
    yield
    torch.set_num_threads(threads)


def tiny_train(**overrides):
    from acornlm.train.config import TrainConfig

    settings = dict(max_steps=4, batch_size=2, seq_len=64, learning_rate=3e-3, min_lr=3e-4, warmup_steps=1,
                    weight_decay=0.0, eval_interval=2, eval_batches=2, save_interval=2, log_interval=1, progress=False)
    return TrainConfig(**{**settings, **overrides})


def read_metrics(run_dir):
    import json

    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_batches_are_a_pure_function_of_the_step_with_normalised_groups(tiny_checkpoint):
    from acornlm.data.chat import IM_END_ID
    from acornlm.data.prompts import task_prompt_records
    from acornlm.model.checkpoint import load_model
    from acornlm.tokenizer import load_tokenizer
    from acornlm.train.grpo import GRPOBatches

    model, _ = load_model(tiny_checkpoint)
    tokenizer = load_tokenizer(tiny_checkpoint)
    lengths = RewardRunner([lambda completion, example: float(len(completion))])  # varied rewards
    batches = GRPOBatches(model, tokenizer, task_prompt_records("arithmetic", 10, 0, "train"),
                          task_prompt_records("arithmetic", 4, 0, "heldout"), lengths, group_size=4, batch_size=2,
                          max_new_tokens=6, temperature=1.5, seed=3)
    first, again, other = batches.batch(1, 0), batches.batch(1, 0), batches.batch(2, 0)
    assert all(torch.equal(first[key], again[key]) for key in first)
    assert not torch.equal(first["input_ids"], other["input_ids"])
    assert first["input_ids"].shape[0] == 8 and first["advantages"].shape == (8,)
    assert torch.allclose(first["advantages"], group_advantages(first["rewards"], 4))
    for row in range(8):  # the mask covers exactly the sampled completion (+ <|im_end|> when it stopped)
        targets = first["targets"][row][first["mask"][row].bool()].tolist()
        assert len(targets) == first["completion_lengths"][row]
        assert IM_END_ID not in targets[:-1]
    model.train()
    batches.batch(0, 0)
    assert model.training  # sampling ran in eval mode (no dropout) and restored training mode


def test_grpo_cli_with_kl_starts_at_zero_kl_and_survives_a_failing_reward(tiny_checkpoint, tmp_path):
    from acornlm.cli.align import grpo
    from acornlm.model.lora import LoraConfig, load_model_with_adapter

    rewards = tmp_path / "my_rewards.py"
    rewards.write_text("def flaky(completion, example):\n"
                       "    if len(completion) % 2:\n"
                       "        raise ValueError('odd length')\n"
                       "    return 1.0\n")
    out = tmp_path / "run"
    with pytest.warns(RuntimeWarning, match="'.*my_rewards.py:flaky' raised ValueError: odd length") as caught:
        grpo(init=str(tiny_checkpoint), out=str(out), tasks="arithmetic", num_prompts=10,
             grpo=GRPOConfig(reward=f"task,{rewards}:flaky", group_size=4, max_new_tokens=6, kl_beta=0.1),
             lora=LoraConfig(rank=2, alpha=4.0), train=tiny_train())
    assert len([w for w in caught if "flaky" in str(w.message)]) == 1  # shown once
    records = read_metrics(out)
    assert records[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # LoRA starts as the reference (B = 0)
    assert sum(r["reward_errors"] for r in records) > 0
    assert all(0 <= r["reward"] <= 2 for r in records)
    assert "val_reward" in records[-1] and records[-1]["val_loss"] == pytest.approx(-records[-1]["val_reward"])
    model, info = load_model_with_adapter(out)
    assert info["stage"] == "grpo" and info["grpo"]["group_size"] == 4


def test_grpo_raises_a_simple_reward(tiny_checkpoint, tmp_path):
    """Reward: how many of the completion's characters are digits. A few steps must raise it."""
    from acornlm.cli.align import grpo

    rewards = tmp_path / "digits.py"
    rewards.write_text("def digits(completion, example):\n"
                       "    return sum(c.isdigit() for c in completion) / max(len(completion), 1)\n")
    out = tmp_path / "run"
    grpo(init=str(tiny_checkpoint), out=str(out), tasks="reverse", num_prompts=20,
         grpo=GRPOConfig(reward=f"{rewards}:digits", group_size=8, max_new_tokens=8, temperature=1.0),
         train=tiny_train(max_steps=12, batch_size=2, learning_rate=2e-2, min_lr=2e-2, eval_interval=0))
    rewards_per_step = [r["reward"] for r in read_metrics(out)]
    assert sum(rewards_per_step[-3:]) / 3 > 2 * sum(rewards_per_step[:3]) / 3 + 0.05, rewards_per_step


def test_bad_reward_specs_are_config_errors(tmp_path):
    from acornlm.errors import ConfigError
    from acornlm.train.rewards import load_reward_functions

    with pytest.raises(ConfigError, match="neither a built-in reward"):
        load_reward_functions("accuracy")
    with pytest.raises(ConfigError, match="does not exist"):
        load_reward_functions(f"{tmp_path / 'missing.py'}:score")
    (tmp_path / "r.py").write_text("x = 1\n")
    with pytest.raises(ConfigError, match="no function 'score'"):
        load_reward_functions(f"{tmp_path / 'r.py'}:score")
    functions, names = load_reward_functions("task, acornlm.data.tasks:exact_match")
    assert names == ["task", "acornlm.data.tasks:exact_match"] and len(functions) == 2


def test_grpo_resume_is_bitwise_identical(tiny_checkpoint, tmp_path):
    """Online sampling is seeded by the step and uses the restored weights, so a resumed run samples,
    and ends, exactly like one that never stopped."""
    import shutil

    from acornlm.cli.align import grpo
    from acornlm.train.metrics import TIMING_FIELDS

    settings = dict(init=str(tiny_checkpoint), tasks="arithmetic", num_prompts=10,
                    grpo=GRPOConfig(group_size=4, max_new_tokens=6, kl_beta=0.1), train=tiny_train(eval_interval=0))
    straight = tmp_path / "straight"
    grpo(out=str(straight), **settings)
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(straight / "checkpoints" / "step-0000002", resumed / "checkpoints" / "step-0000002")
    (resumed / "checkpoints" / "latest").write_text("step-0000002\n")
    grpo(out=str(resumed), resume=True, **settings)
    final = "checkpoints/step-0000004/model.safetensors"
    assert (straight / final).read_bytes() == (resumed / final).read_bytes()

    def without_timing(run):
        return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in read_metrics(run) if r["step"] > 2]
    assert without_timing(straight) == without_timing(resumed)
