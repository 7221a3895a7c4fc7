"""The reward-model stage: the Bradley-Terry loss by hand, accuracy counting, the model's last-token
read-out, the stage end to end (CLI, exact resume), the checks PPO/GRPO rely on, and HF export parity."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from test_dpo import read_metrics, tiny_train, write_tiny_checkpoint

from acornlm.errors import ConfigError
from acornlm.train.losses import bradley_terry_loss
from acornlm.train.reward import RewardConfig, RewardLoss, reward_metrics
from acornlm.train.reward_model import (
    RewardModel,
    check_reward_tokenizer,
    load_reward_model,
    reward_model_tokenizer_problem,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


# --- the loss and the metrics ---

def test_bradley_terry_loss_equals_hand_computation():
    chosen, rejected = torch.tensor([2.0, -1.0, 0.5]), torch.tensor([1.0, 1.0, 0.5])
    # gaps 1, -2, 0: L = -mean(log sigmoid(gap))
    expected = -(log_sigmoid(1.0) + log_sigmoid(-2.0) + log_sigmoid(0.0)) / 3
    assert bradley_terry_loss(chosen, rejected).item() == pytest.approx(expected, rel=1e-6)
    margin = torch.tensor([0.5, 0.0, 1.0])
    expected = -(log_sigmoid(0.5) + log_sigmoid(-2.0) + log_sigmoid(-1.0)) / 3
    assert bradley_terry_loss(chosen, rejected, margin).item() == pytest.approx(expected, rel=1e-6)
    # stable far out, where log(sigmoid(x)) would be log(0)
    assert bradley_terry_loss(torch.tensor([-200.0]), torch.tensor([0.0])).item() == pytest.approx(200.0)
    # descending the loss raises the chosen reward and lowers the rejected one
    rewards = torch.tensor([0.0, 0.0], requires_grad=True)
    bradley_terry_loss(rewards[:1], rewards[1:]).backward()
    assert rewards.grad.tolist() == pytest.approx([-0.5, 0.5])


class FixedRewards(torch.nn.Module):
    """A stand-in model whose rewards are given: rows are chosen answers first, then rejected ones."""

    def __init__(self, rewards: list[float]) -> None:
        super().__init__()
        self.rewards = torch.tensor(rewards)

    def forward(self, input_ids, lengths):
        assert input_ids.shape[0] == lengths.shape[0] == self.rewards.shape[0]
        return self.rewards


def test_reward_accuracy_is_counted_on_a_hand_made_batch():
    # 4 pairs: right (3 > 1), wrong (0 < 2), a tie (counts as wrong), right (-1 > -4)
    model = FixedRewards([3.0, 0.0, 5.0, -1.0, 1.0, 2.0, 5.0, -4.0])
    batch = {"input_ids": torch.zeros(8, 3, dtype=torch.long), "lengths": torch.full((8,), 3)}
    loss_fn = RewardLoss()
    loss = loss_fn(model, batch)
    gaps = [2.0, -2.0, 0.0, 3.0]
    assert loss.item() == pytest.approx(-sum(log_sigmoid(g) for g in gaps) / 4, rel=1e-6)
    metrics = loss_fn.pop_metrics(training=True)
    assert metrics["reward_accuracy"] == 0.5
    assert metrics["reward_margin"] == pytest.approx(sum(gaps) / 4)
    assert metrics["chosen_reward"] == pytest.approx(7 / 4) and metrics["rejected_reward"] == pytest.approx(1.0)
    model.eval()  # validation numbers are prefixed
    loss_fn(model, batch)
    assert loss_fn.pop_metrics(training=False)["val_reward_accuracy"] == 0.5
    # TRL's centering term: + c * mean((r_c + r_r)^2)
    centered = RewardLoss(center_rewards_coefficient=0.1)(model, batch)
    sums = [4.0, 2.0, 10.0, -5.0]
    assert centered.item() == pytest.approx(loss.item() + 0.1 * sum(s * s for s in sums) / 4, rel=1e-6)
    assert reward_metrics(torch.tensor([1.0]), torch.tensor([0.0]))["reward_accuracy"] == 1.0
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="center_rewards_coefficient"):
            RewardConfig(center_rewards_coefficient=bad)


# --- the model ---

def tiny_config(**fields):
    from acornlm.model import ModelConfig

    base = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=96, rope_theta=10000.0)
    return ModelConfig(**{**base, **fields})


def test_the_reward_is_read_at_each_rows_last_real_token():
    from acornlm.model import Transformer
    from acornlm.tokenizer.special_tokens import SPECIAL_TOKENS

    torch.manual_seed(0)
    policy = Transformer(tiny_config(tie_word_embeddings=False))
    model = RewardModel.from_policy(policy, seed=3).eval()
    names = set(model.state_dict())
    assert "score.weight" in names and not any(name.startswith("lm_head") for name in names)
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, policy.model.layers[0].mlp.up_proj.weight)
    assert torch.equal(model.score.weight, RewardModel.from_policy(policy, seed=3).score.weight)  # seeded
    assert not torch.equal(model.score.weight, RewardModel.from_policy(policy, seed=4).score.weight)
    rows = [[5, 9, 14, 20, 7], [11, 4], [30, 31, 32]]
    with torch.no_grad():
        alone = torch.stack([model(torch.tensor([row]))[0] for row in rows])
        pad = SPECIAL_TOKENS.index("<|endoftext|>")
        padded = torch.tensor([row + [pad] * (5 - len(row)) for row in rows])
        together = model(padded, torch.tensor([len(row) for row in rows]))
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)

    class Pad:  # the two things score_texts needs of a tokenizer
        eot_id = pad

        def encode(self, text):
            return [ord(c) % 250 + 3 for c in text]

    model.train()
    scored = model.score_texts(Pad(), rows, batch_size=2)  # batched by length, returned in input order
    assert model.training and not scored.requires_grad and scored.dtype == torch.float32
    torch.testing.assert_close(scored, alone, atol=1e-5, rtol=1e-5)
    assert model.score_texts(Pad(), ["hi"]).shape == (1,)
    with pytest.raises(ConfigError, match="more than the reward model's context"):
        model.score_texts(Pad(), [[5] * 97])
    with pytest.raises(ConfigError, match="outside the reward model's vocabulary"):
        model.score_texts(Pad(), [[5, 300]])


# --- the stage end to end ---

@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("reward") / "init")


SETTINGS = dict(tasks="arithmetic", num_pairs=24)


@pytest.fixture(scope="module")
def reward_run(tiny_checkpoint, tmp_path_factory):
    """A 6-step reward run on synthetic arithmetic pairs, checkpoints at steps 3 and 6."""
    from acornlm.cli.align import reward

    out = tmp_path_factory.mktemp("reward-run") / "run"
    reward(init=str(tiny_checkpoint), out=str(out), train=tiny_train(), **SETTINGS)
    return out


def test_reward_run_logs_pair_accuracy_and_saves_a_reward_model(reward_run, tiny_checkpoint):
    from acornlm.model.checkpoint import load_model

    records = read_metrics(reward_run)
    for key in ("reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward"):
        assert key in records[-1] and "val_" + key in records[-1]
    assert 0.0 <= records[-1]["val_reward_accuracy"] <= 1.0
    assert records[0]["loss"] == pytest.approx(math.log(2), abs=0.05)  # a small random head: gaps near 0
    info = json.loads((reward_run / "checkpoints" / "step-0000006" / "config.json").read_text())
    assert (info["stage"], info["head"], info["init"]) == ("reward", "score", str(tiny_checkpoint))
    model = load_reward_model(reward_run)
    assert isinstance(model, RewardModel) and not model.training
    init_score = RewardModel.from_policy(load_model(tiny_checkpoint)[0], seed=0).score.weight  # train.seed 0
    assert not torch.equal(model.score.weight, init_score)  # the head trained


def test_reward_resume_is_bitwise_identical(reward_run, tiny_checkpoint, tmp_path):
    from acornlm.cli.align import reward
    from acornlm.train.metrics import TIMING_FIELDS

    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(reward_run / "checkpoints" / "step-0000003", resumed / "checkpoints" / "step-0000003")
    (resumed / "checkpoints" / "latest").write_text("step-0000003\n")
    (resumed / "metrics.jsonl").write_text("".join(line + "\n" for line in
                                                   (reward_run / "metrics.jsonl").read_text().splitlines()[:3]))
    reward(init=str(tiny_checkpoint), out=str(resumed), resume=True, train=tiny_train(), **SETTINGS)
    final = "checkpoints/step-0000006/model.safetensors"
    assert (reward_run / final).read_bytes() == (resumed / final).read_bytes()

    def without_timing(run):
        return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in read_metrics(run)]
    assert without_timing(reward_run) == without_timing(resumed)


def test_an_easy_preference_is_learned_from_a_file_and_training_continues_from_it(tiny_checkpoint, tmp_path):
    """Chosen answers that all say "yes" beat "no": the margin must grow and every held-out pair be
    ranked right. A reward model given as --init is trained further (its head kept, not replaced)."""
    from acornlm.train.reward import run_reward

    records = [{"prompt": f"Is {i} a number?", "chosen": "yes, it is", "rejected": "no"} for i in range(40)]
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    first = run_reward(str(data), tiny_checkpoint, tmp_path / "run", tiny_train(max_steps=10, eval_interval=10,
                                                                                 save_interval=10),
                       val_fraction=0.2)
    records = read_metrics(tmp_path / "run")
    assert first["val_reward_accuracy"] == 1.0 and first["data"]["val_pairs"] == 8
    assert records[-1]["val_reward_margin"] > records[0]["reward_margin"] + 1.0
    more = tmp_path / "more"
    run_reward(str(data), tmp_path / "run", more, tiny_train(max_steps=1, eval_interval=1, save_interval=1))
    assert read_metrics(more)[0]["loss"] < 0.5 * math.log(2)  # it starts where the first run ended


def test_reward_through_the_command_line(tiny_checkpoint, tmp_path, capsys):
    from acornlm.cli import main

    out = tmp_path / "run"
    main(["train", "reward", "--init", str(tiny_checkpoint), "--out", str(out), "--tasks", "arithmetic",
          "--num-pairs", "16", "--reward.center_rewards_coefficient", "0.01", "--train.max_steps", "2",
          "--train.batch_size", "2", "--train.seq_len", "64", "--train.eval_interval", "2",
          "--train.eval_batches", "1", "--train.progress", "false"])
    assert "held-out pair accuracy" in capsys.readouterr().err
    assert "val_reward_accuracy" in read_metrics(out)[-1]
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "reward", "--init", str(tiny_checkpoint), "--out", str(tmp_path / "x"), "--tasks", "sort",
              "--lora.rank", "4", "--train.seq_len", "64"])
    assert exit_info.value.code == 2 and "LoRA (--lora.rank > 0) is not supported" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "reward", "--help"])
    assert "--reward.center_rewards_coefficient" in capsys.readouterr().out


def test_reward_defaults_come_from_yaml():
    import dataclasses

    from acornlm.cli import align
    from acornlm.train.config import TrainConfig, stage_defaults

    defaults = stage_defaults("reward")
    assert align.DEFAULT_REWARD_TRAIN == TrainConfig(**defaults["train"])
    assert dataclasses.asdict(align.DEFAULT_REWARD) == defaults["reward"]


# --- what PPO and GRPO rely on ---

def test_a_policy_checkpoint_is_not_a_reward_model(tiny_checkpoint):
    with pytest.raises(ConfigError, match=r"is not a reward model.*train one with acornlm train reward"):
        load_reward_model(tiny_checkpoint)


def test_tokenizer_mismatch_is_refused(reward_run, tiny_checkpoint):
    from acornlm.tokenizer import load_tokenizer, train_tokenizer

    same = load_tokenizer(tiny_checkpoint)
    assert reward_model_tokenizer_problem(reward_run, same) is None
    check_reward_tokenizer(reward_run, same)
    other = train_tokenizer(["the king speaks to the queen by the river"] * 20, kind="bpe", vocab_size=280)
    assert "another tokenizer" in reward_model_tokenizer_problem(reward_run, other)
    with pytest.raises(ConfigError, match="uses another tokenizer .* than the policy"):
        check_reward_tokenizer(reward_run, other)


# --- export as a transformers sequence classifier ---

def write_reward_checkpoint(directory, tokenizer_dir, **fields):
    """An untrained reward model of another family, saved as the stage saves one."""
    from acornlm.model.checkpoint import write_model_files
    from acornlm.tokenizer import load_tokenizer

    torch.manual_seed(1)
    model = RewardModel(tiny_config(vocab_size=load_tokenizer(tokenizer_dir).vocab_size, **fields))
    directory.mkdir(parents=True)
    write_model_files(directory, model, {"stage": "reward", "head": "score"}, tokenizer_dir=tokenizer_dir)
    return directory


@pytest.mark.parametrize("family", ["llama", "qwen3", "gpt2", "qwen3_moe"])
def test_export_gives_transformers_the_same_rewards(reward_run, tiny_checkpoint, tmp_path, family):
    transformers = pytest.importorskip("transformers")
    from acornlm.export.hf import describe_export, export_hf
    from acornlm.tokenizer import load_tokenizer

    fields = {"qwen3": dict(qk_norm=True, num_key_value_heads=2, tie_word_embeddings=False),
              "gpt2": dict(position="learned", norm="layernorm", mlp="gelu", attention_bias=True, mlp_bias=True,
                           norm_eps=1e-5),
              "qwen3_moe": dict(qk_norm=True, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
                                norm_topk_prob=False, tie_word_embeddings=False)}
    ckpt = reward_run if family == "llama" else write_reward_checkpoint(tmp_path / "ckpt", tiny_checkpoint,
                                                                        **fields[family])
    out = tmp_path / "hf"
    summary = export_hf(ckpt, out)
    assert summary["verification"]["rewards_max_abs_diff"] <= 1e-4
    assert "verified with transformers" in describe_export(summary)
    config = json.loads((out / "config.json").read_text())
    expected = {"llama": "LlamaForSequenceClassification", "qwen3": "Qwen3ForSequenceClassification",
                "gpt2": "GPT2ForSequenceClassification", "qwen3_moe": "Qwen3MoeForSequenceClassification"}[family]
    tokenizer = load_tokenizer(tiny_checkpoint)
    assert config["architectures"] == [expected] and config["num_labels"] == 1
    assert config["pad_token_id"] == tokenizer.eot_id

    ours = load_reward_model(ckpt)
    theirs = transformers.AutoModelForSequenceClassification.from_pretrained(str(out), dtype=torch.float32).eval()
    chats = [[{"role": "user", "content": "What is 12 + 30?"}, {"role": "assistant", "content": answer}]
             for answer in ("42", "43 is the sum", "4")]
    from acornlm.data.chat import render_chat

    rows = [render_chat(tokenizer, chat).ids for chat in chats]
    lengths = torch.tensor([len(row) for row in rows])
    ids = torch.tensor([row + [tokenizer.eot_id] * (max(lengths) - len(row)) for row in rows])
    mask = (torch.arange(ids.shape[1])[None] < lengths[:, None]).long()
    with torch.no_grad():
        expected_rewards = ours(ids, lengths)
        logits = theirs(input_ids=ids, attention_mask=mask).logits
    assert logits.shape == (3, 1)
    torch.testing.assert_close(logits[:, 0], expected_rewards, atol=1e-4, rtol=0)
    torch.testing.assert_close(ours.score_texts(tokenizer, rows), expected_rewards, atol=1e-5, rtol=0)
