"""PPO: GAE, the clipped policy and value losses and the KL-penalty rewards against hand computations;
the stage end to end (reward functions, a reward model), bitwise resume; GRPO's --reward_model."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from test_grpo import read_metrics, tiny_train, write_tiny_checkpoint

from acornlm.errors import ConfigError
from acornlm.train.ppo import (
    PPOConfig,
    explained_variance,
    gae_advantages,
    kl_penalty_rewards,
    ppo_policy_loss,
    ppo_value_loss,
    whiten,
)

pytestmark = pytest.mark.usefixtures("one_thread")

# Two rows: row 0 = 2 prompt targets, 3 completion tokens; row 1 = 1 prompt target, 2 completion
# tokens, 2 padding positions.
MASK = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]])


def hand_gae(rewards: list[float], values: list[float], gamma: float, lam: float) -> tuple[list, list]:
    """A_t = sum_l (gamma lam)^l delta_{t+l}, delta_t = r_t + gamma V_{t+1} - V_t, V after the end 0."""
    n = len(rewards)
    deltas = [rewards[t] + gamma * (values[t + 1] if t + 1 < n else 0.0) - values[t] for t in range(n)]
    advantages = [sum((gamma * lam) ** k * deltas[t + k] for k in range(n - t)) for t in range(n)]
    return advantages, [a + v for a, v in zip(advantages, values)]


@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0), (0.99, 0.0)])
def test_gae_equals_hand_computation(gamma, lam):
    rewards = torch.tensor([[9.0, 9.0, 0.1, -0.2, 1.5], [9.0, 0.3, 2.0, 9.0, 9.0]])  # 9s are masked out
    values = torch.tensor([[5.0, 5.0, 0.4, 0.7, -0.3], [5.0, 1.2, 0.5, 5.0, 5.0]])
    advantages, returns = gae_advantages(rewards, values, MASK, gamma, lam)
    for row in range(2):
        positions = MASK[row].nonzero().flatten().tolist()
        expected_a, expected_r = hand_gae([rewards[row, t].item() for t in positions],
                                          [values[row, t].item() for t in positions], gamma, lam)
        assert advantages[row, positions].tolist() == pytest.approx(expected_a, rel=1e-5)
        assert returns[row, positions].tolist() == pytest.approx(expected_r, rel=1e-5)
    assert advantages[MASK == 0].abs().max() == 0 and returns[MASK == 0].abs().max() == 0
    if gamma == 1.0 and lam == 1.0:  # Monte-Carlo: the rewards still to come, minus V
        assert advantages[0, 2].item() == pytest.approx(0.1 - 0.2 + 1.5 - 0.4)


def test_kl_penalty_rewards_put_the_score_on_the_last_completion_token():
    logprobs = torch.tensor([[-1.0, -2.0, -0.5, -1.0, -0.2], [-1.0, -0.3, -0.9, -1.0, -1.0]])
    reference = torch.tensor([[-3.0, -1.0, -0.7, -1.0, -0.6], [-2.0, -0.5, -0.4, -2.0, -2.0]])
    scores = torch.tensor([2.0, -1.0])
    rewards = kl_penalty_rewards(logprobs, reference, scores, MASK, kl_coef=0.1)
    expected = [[0.0, 0.0, -0.1 * 0.2, 0.0, -0.1 * 0.4 + 2.0], [0.0, -0.1 * 0.2, -0.1 * -0.5 - 1.0, 0.0, 0.0]]
    assert rewards.tolist() == [pytest.approx(row, abs=1e-6) for row in expected]
    # a row without completion tokens gets nothing, not its score on position 0
    empty = kl_penalty_rewards(logprobs[:1], reference[:1], scores[:1], torch.zeros(1, 5), kl_coef=0.1)
    assert empty.abs().max() == 0


def test_policy_loss_equals_hand_computation_with_clipping():
    logprobs = torch.tensor([[0.0, 0.0, -1.0, -1.0, 0.0], [0.0, -2.0, -0.5, 0.0, 0.0]])
    old = torch.tensor([[0.0, 0.0, -1.5, -1.0, 0.3], [0.0, -2.0, -0.2, 0.0, 0.0]])
    advantages = torch.tensor([[0.0, 0.0, 1.0, -0.5, -2.0], [0.0, 0.7, -1.0, 0.0, 0.0]])
    clip = 0.2

    def term(p, o, a):
        ratio = math.exp(p - o)
        return -min(ratio * a, min(max(ratio, 1 - clip), 1 + clip) * a)

    positions = [(0, 2), (0, 3), (0, 4), (1, 1), (1, 2)]
    expected = sum(term(logprobs[i, t].item(), old[i, t].item(), advantages[i, t].item()) for i, t in positions) / 5
    loss, clipped = ppo_policy_loss(logprobs, old, advantages, MASK, clip)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # ratio e^0.5 with A=+1 clipped at 1.2; e^-0.3 with A=-2 clipped at 0.8; e^-0.3 with A=-1 at 0.8
    assert clipped.item() == pytest.approx(3 / 5)


def test_policy_gradient_follows_the_advantage_when_policy_is_old_policy():
    logprobs = torch.full((1, 5), -1.0, requires_grad=True)
    advantages = torch.tensor([[0.0, 0.0, 1.0, -1.0, 2.0]])
    loss, clipped = ppo_policy_loss(logprobs, logprobs.detach(), advantages, MASK[:1])
    loss.backward()
    assert clipped == 0
    assert logprobs.grad[0].tolist() == pytest.approx([0, 0, -1 / 3, 1 / 3, -2 / 3])  # -A / tokens


def test_value_loss_equals_hand_computation_with_clipping():
    values = torch.tensor([[0.0, 0.0, 1.0, 0.5, -0.1], [0.0, 2.0, 0.0, 0.0, 0.0]])
    old = torch.tensor([[0.0, 0.0, 0.5, 0.45, 0.0], [0.0, 1.0, 0.1, 0.0, 0.0]])
    returns = torch.tensor([[0.0, 0.0, 2.0, 0.0, 0.3], [0.0, 0.0, 0.05, 0.0, 0.0]])
    eps = 0.2

    def term(v, o, r):
        clipped = o + min(max(v - o, -eps), eps)
        return 0.5 * max((v - r) ** 2, (clipped - r) ** 2)

    positions = [(0, 2), (0, 3), (0, 4), (1, 1), (1, 2)]
    expected = sum(term(values[i, t].item(), old[i, t].item(), returns[i, t].item()) for i, t in positions) / 5
    loss, clipped = ppo_value_loss(values, old, returns, MASK, eps)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # (0,2): V moved 0.5 towards R, clipped to 0.7, further from R; (1,1): moved 1.0 away from R, clipped
    # nearer R, so the unclipped term is larger. (0,3),(0,4),(1,2) are within the clip range.
    assert clipped.item() == pytest.approx(1 / 5)


def test_whitening_and_explained_variance():
    x = torch.tensor([[7.0, 7.0, 1.0, 2.0, 4.0], [7.0, 3.0, 5.0, 7.0, 7.0]])
    white = whiten(x, MASK)
    kept = white[MASK.bool()]
    assert kept.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert kept.var().item() == pytest.approx(1.0, rel=1e-5)  # unbiased variance 1
    assert white[MASK == 0].abs().max() == 0
    returns = torch.tensor([[0.0, 0.0, 1.0, 2.0, 3.0], [0.0, 4.0, 5.0, 0.0, 0.0]])
    assert explained_variance(returns, returns, MASK).item() == pytest.approx(1.0)
    assert explained_variance(torch.full_like(returns, 3.0), returns, MASK).item() == pytest.approx(0.0, abs=1e-6)
    assert explained_variance(returns, torch.ones_like(returns), MASK).item() == 0  # returns do not vary


def test_ppo_config_checks_its_ranges():
    for fields, message in (({"lam": 1.5}, "--ppo.lam must be in"), ({"clip": 0}, "--ppo.clip must be > 0"),
                            ({"kl_coef": -1}, "--ppo.kl_coef must be >= 0"),
                            ({"temperature": 0}, "--ppo.temperature must be > 0")):
        with pytest.raises(ConfigError, match=message):
            PPOConfig(**fields)


# --- the stage on a tiny model ---

@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ppo") / "init")


def write_reward_model(directory, policy_checkpoint, seed: int = 1):
    """A reward model on the tiny policy's weights and tokenizer, with a random (seeded) score head."""
    from acornlm.model.checkpoint import load_model, write_model_files
    from acornlm.train.reward_model import RewardModel

    directory.mkdir(parents=True)
    model = RewardModel.from_policy(load_model(policy_checkpoint)[0], seed=seed)
    with torch.no_grad():
        model.score.weight.mul_(50)  # rewards of order 1, not 0.02
    write_model_files(directory, model, {"stage": "reward", "head": "score"}, tokenizer_dir=policy_checkpoint)
    return directory


@pytest.fixture(scope="module")
def reward_model_dir(tiny_checkpoint, tmp_path_factory):
    return write_reward_model(tmp_path_factory.mktemp("ppo-rm") / "rm", tiny_checkpoint)


PPO_SETTINGS = dict(num_samples=2, max_new_tokens=6)


def test_ppo_cli_with_task_rewards_logs_its_metrics_and_saves_the_value_head(tiny_checkpoint, tmp_path, capsys):
    from acornlm.cli import main
    from acornlm.model.checkpoint import load_model

    out = tmp_path / "run"
    main(["train", "ppo", "--init", str(tiny_checkpoint), "--out", str(out), "--tasks", "arithmetic",
          "--num_prompts", "10", "--ppo.num_samples", "2", "--ppo.max_new_tokens", "6",
          "--train.max_steps", "3", "--train.batch_size", "2", "--train.seq_len", "64",
          "--train.eval_interval", "0", "--train.eval_batches", "1", "--train.log_interval", "1",
          "--train.learning_rate", "3e-3", "--train.warmup_steps", "0", "--train.progress", "false"])
    assert "held-out mean reward" in capsys.readouterr().err
    records = read_metrics(out)
    assert len(records) == 3
    for name in ("reward", "kl", "policy_loss", "value_loss", "clipped_fraction", "explained_variance"):
        assert all(math.isfinite(r[name]) for r in records), name
    assert records[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # the policy starts as the reference
    assert records[0]["value"] == 0 and records[-1]["value"] != 0  # the value head starts at 0, then learns
    assert all(0 <= r["reward"] <= 1 for r in records)
    assert "val_reward" in records[-1] and 0 <= records[-1]["val_task_accuracy"] <= 1
    assert records[-1]["val_loss"] == pytest.approx(-records[-1]["val_reward"])
    final = out / "checkpoints" / "step-0000003"
    assert (final / "value_head.safetensors").is_file()
    _, info = load_model(out)  # model.safetensors stays a plain policy checkpoint
    assert info["stage"] == "ppo" and info["ppo"]["num_samples"] == 2 and info["rewards"] == "task"


def test_ppo_raises_a_simple_reward(tiny_checkpoint, tmp_path):
    """Reward: how many of the completion's characters are digits. A few steps must raise it."""
    from acornlm.cli.align import ppo

    rewards = tmp_path / "digits.py"
    rewards.write_text("def digits(completion, example):\n"
                       "    return sum(c.isdigit() for c in completion) / max(len(completion), 1)\n")
    out = tmp_path / "run"
    ppo(init=str(tiny_checkpoint), out=str(out), tasks="reverse", num_prompts=20, rewards=f"{rewards}:digits",
        ppo=PPOConfig(num_samples=8, max_new_tokens=8, kl_coef=0.0),
        train=tiny_train(max_steps=12, batch_size=2, learning_rate=2e-2, min_lr=2e-2, eval_interval=0,
                         eval_batches=1))
    rewards_per_step = [r["reward"] for r in read_metrics(out)]
    assert sum(rewards_per_step[-3:]) / 3 > 2 * sum(rewards_per_step[:3]) / 3 + 0.05, rewards_per_step


def test_ppo_defaults_come_from_yaml_and_the_cli_checks_them(capsys):
    import dataclasses

    from acornlm.cli import align, main
    from acornlm.train.config import TrainConfig, stage_defaults

    defaults = stage_defaults("ppo")
    assert align.DEFAULT_PPO_TRAIN == TrainConfig(**defaults["train"])
    assert dataclasses.asdict(align.DEFAULT_PPO) == defaults["ppo"]
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "ppo", "--init", "x", "--out", "y", "--ppo.lam", "2"])
    assert exit_info.value.code == 2 and "--ppo.lam must be in [0, 1]" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "ppo", "--help"])
    help_text = capsys.readouterr().out
    assert all(option in help_text for option in ("--ppo.kl_coef", "--reward_model", "--rewards", "--resume"))


def test_rewards_add_the_reward_model_score_to_the_reward_functions(tiny_checkpoint, reward_model_dir):
    from acornlm.data.prompts import task_prompt_records
    from acornlm.model.checkpoint import load_model
    from acornlm.tokenizer import load_tokenizer
    from acornlm.train.reward_model import load_reward_model
    from acornlm.train.rewards import RewardRunner
    from acornlm.train.rollouts import Rollouts

    policy, _ = load_model(tiny_checkpoint)
    tokenizer = load_tokenizer(tiny_checkpoint)
    scorer = load_reward_model(reward_model_dir)
    records = task_prompt_records("arithmetic", 6, 0, "train")
    settings = dict(num_samples=2, batch_size=2, max_new_tokens=6, temperature=1.0, seed=3)
    both = Rollouts(policy, tokenizer, records, records, RewardRunner([lambda c, e: 1.0]), reward_model=scorer,
                    **settings)
    batch = both.batch(0, 0)
    assert batch["rewards"].shape == (4,)
    only_model = Rollouts(policy, tokenizer, records, records, None, reward_model=scorer, **settings).batch(0, 0)
    assert torch.equal(batch["input_ids"], only_model["input_ids"])  # the same samples
    assert torch.allclose(batch["rewards"], only_model["rewards"] + 1.0)
    assert only_model["rewards"].std() > 0  # the reward model tells the samples apart
    with pytest.raises(ConfigError, match="needs a reward"):
        Rollouts(policy, tokenizer, records, records, None, **settings)


def test_ppo_with_a_reward_model_only_and_lora(tiny_checkpoint, reward_model_dir, tmp_path):
    from acornlm.cli.align import ppo
    from acornlm.model.lora import LoraConfig

    out = tmp_path / "run"
    ppo(init=str(tiny_checkpoint), out=str(out), tasks="arithmetic", num_prompts=10,
        reward_model=str(reward_model_dir), ppo=PPOConfig(**PPO_SETTINGS), lora=LoraConfig(rank=2, alpha=4.0),
        train=tiny_train(max_steps=2, eval_interval=0, eval_batches=1))
    records = read_metrics(out)
    assert records[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # LoRA starts as the reference (B = 0)
    assert all(r["reward_errors"] == 0 for r in records)
    assert any(not 0 <= r["reward"] <= 1 or r["reward_std"] > 0 for r in records)  # model scores, not 0/1
    final = out / "checkpoints" / "step-0000002"
    assert (final / "value_head.safetensors").is_file() and (final / "adapter_config.json").is_file()


def test_ppo_resume_is_bitwise_identical(tiny_checkpoint, tmp_path):
    """Sampling is seeded by the step, and the value head and optimizer state come back from the
    checkpoint: a resumed run ends exactly like one that never stopped."""
    from acornlm.cli.align import ppo
    from acornlm.train.metrics import TIMING_FIELDS

    settings = dict(init=str(tiny_checkpoint), tasks="arithmetic", num_prompts=10, ppo=PPOConfig(**PPO_SETTINGS),
                    train=tiny_train(eval_interval=0, eval_batches=1))
    straight = tmp_path / "straight"
    ppo(out=str(straight), **settings)
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(straight / "checkpoints" / "step-0000002", resumed / "checkpoints" / "step-0000002")
    (resumed / "checkpoints" / "latest").write_text("step-0000002\n")
    ppo(out=str(resumed), resume=True, **settings)
    for name in ("model.safetensors", "value_head.safetensors"):
        final = f"checkpoints/step-0000004/{name}"
        assert (straight / final).read_bytes() == (resumed / final).read_bytes(), name

    def without_timing(run):
        return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in read_metrics(run) if r["step"] > 2]
    assert without_timing(straight) == without_timing(resumed)


def test_a_reward_model_with_another_tokenizer_is_refused(tiny_checkpoint, tmp_path):
    from acornlm.cli.align import grpo, ppo
    from acornlm.data.chat import chat_text
    from acornlm.data.tasks import make_dataset
    from acornlm.model import ModelConfig
    from acornlm.model.checkpoint import write_model_files
    from acornlm.tokenizer import train_tokenizer
    from acornlm.train.reward_model import RewardModel

    other = tmp_path / "other-rm"
    other.mkdir()
    texts = [chat_text(example.messages()) for example in make_dataset("all", 100, seed=0)]
    train_tokenizer(texts, kind="bpe", vocab_size=280).save(tmp_path / "other-tokenizer")
    config = ModelConfig(vocab_size=280, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, max_position_embeddings=96)
    write_model_files(other, RewardModel(config), {"stage": "reward", "head": "score"},
                      tokenizer_dir=tmp_path / "other-tokenizer")
    common = dict(init=str(tiny_checkpoint), tasks="arithmetic", num_prompts=10, reward_model=str(other),
                  train=tiny_train(max_steps=1))
    with pytest.raises(ConfigError, match="another tokenizer"):
        ppo(out=str(tmp_path / "ppo"), ppo=PPOConfig(**PPO_SETTINGS), **common)
    with pytest.raises(ConfigError, match="another tokenizer"):
        grpo(out=str(tmp_path / "grpo"), **common)


def test_grpo_with_a_reward_model(tiny_checkpoint, reward_model_dir, tmp_path):
    from acornlm.cli.align import grpo
    from acornlm.model.checkpoint import load_model
    from acornlm.train.grpo import GRPOConfig

    out = tmp_path / "run"
    grpo(init=str(tiny_checkpoint), out=str(out), tasks="arithmetic", num_prompts=10,
         reward_model=str(reward_model_dir), grpo=GRPOConfig(reward="task", group_size=2, max_new_tokens=6),
         train=tiny_train(max_steps=2, eval_interval=0, eval_batches=1))
    records = read_metrics(out)
    assert all(r["reward_errors"] == 0 for r in records) and "val_reward" in records[-1]
    _, info = load_model(out)
    assert info["reward_model"] == str(reward_model_dir) and info["grpo"]["reward"] == "task"
