"""DPO: the loss against hand computations, the preference formats, and the stage end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch

from acornlm.data.preferences import detect_preference_format, load_preference_pairs
from acornlm.errors import ConfigError, DataError
from acornlm.train.dpo import DPOConfig, check_dpo_settings, dpo_loss
from acornlm.train.losses import sequence_logprobs


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


# --- the loss ---

def test_sequence_logprobs_sum_the_answer_tokens_only():
    logits = torch.tensor([[[1.0, 2.0, 0.0], [0.0, 0.0, 3.0], [2.0, 1.0, 1.0]]])
    targets = torch.tensor([[1, 2, 0]])
    mask = torch.tensor([[0, 1, 1]])

    def log_p(row, target):
        values = logits[0, row].tolist()
        return values[target] - math.log(sum(math.exp(v) for v in values))

    expected = log_p(1, 2) + log_p(2, 0)  # position 0 is prompt: not counted
    assert sequence_logprobs(logits, targets, mask).item() == pytest.approx(expected, rel=1e-6)
    assert sequence_logprobs(logits, targets, mask, average=True).item() == pytest.approx(expected / 2, rel=1e-6)


def test_dpo_loss_equals_hand_computation():
    policy_chosen, policy_rejected = torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -1.0])
    ref_chosen, ref_rejected = torch.tensor([-1.5, -2.0]), torch.tensor([-1.5, -2.0])
    beta = 0.5
    out = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=beta)
    # pair 0: chosen ratio +0.5, rejected ratio -0.5 -> h = 1; pair 1: -1 and +1 -> h = -2
    assert out.losses.tolist() == pytest.approx([-log_sigmoid(0.5), -log_sigmoid(-1.0)], rel=1e-6)
    assert out.chosen_rewards.tolist() == pytest.approx([0.25, -0.5])
    assert out.rejected_rewards.tolist() == pytest.approx([-0.25, 0.5])
    assert out.margins.tolist() == pytest.approx([0.5, -1.0])
    assert out.accuracy.item() == 0.5

    smoothed = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=beta, label_smoothing=0.1)
    expected = -0.9 * log_sigmoid(0.5) - 0.1 * log_sigmoid(-0.5)
    assert smoothed.losses[0].item() == pytest.approx(expected, rel=1e-6)

    ipo = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=beta, loss_type="ipo")
    assert ipo.losses.tolist() == pytest.approx([(1 - 1 / (2 * beta)) ** 2, (-2 - 1 / (2 * beta)) ** 2])


def test_dpo_gradient_raises_chosen_and_lowers_rejected():
    policy = torch.tensor([-2.0, -2.0], requires_grad=True)
    out = dpo_loss(policy[:1], policy[1:], torch.tensor([-2.0]), torch.tensor([-2.0]), beta=0.1)
    out.losses.sum().backward()
    assert policy.grad[0] < 0 < policy.grad[1]  # descending the loss raises chosen, lowers rejected
    assert out.losses.item() == pytest.approx(math.log(2))  # policy == reference: margin 0


@pytest.mark.parametrize("beta,smoothing,kind", [(0.0, 0.0, "sigmoid"), (0.1, 0.5, "sigmoid"),
                                                   (0.1, 0.1, "ipo"), (0.1, 0.0, "hinge")])
def test_impossible_dpo_settings_are_config_errors(beta, smoothing, kind):
    with pytest.raises(ConfigError):
        check_dpo_settings(beta, smoothing, kind)


# --- preference formats ---

PROMPT = [{"role": "user", "content": "2+2?"}]
FORMATS = {
    "trl-strings": ("trl", {"prompt": "2+2?", "chosen": "4", "rejected": "5"}),
    "trl-messages": ("trl", {"prompt": PROMPT, "chosen": [{"role": "assistant", "content": "4"}],
                             "rejected": [{"role": "assistant", "content": "5"}]}),
    "minimind": ("minimind", {"chosen": [*PROMPT, {"role": "assistant", "content": "4"}],
                              "rejected": [*PROMPT, {"role": "assistant", "content": "5"}]}),
    "alpaca": ("alpaca", {"instruction": "2+2?", "input": "", "chosen": "4", "rejected": "5"}),
    "alpaca-ranking": ("alpaca", {"instruction": "2+2?", "output": ["4", "5"]}),
    "sharegpt": ("sharegpt", {"conversations": [{"from": "human", "value": "2+2?"}],
                              "chosen": {"from": "gpt", "value": "4"}, "rejected": {"from": "gpt", "value": "5"}}),
}


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_every_format_parses_to_the_same_pair(tmp_path, name):
    expected_format, record = FORMATS[name]
    assert detect_preference_format(record) == expected_format
    pairs, stats = load_preference_pairs(write_jsonl(tmp_path / "p.jsonl", [record]))
    assert (pairs[0].prompt, pairs[0].chosen, pairs[0].rejected) == ((("user", "2+2?"),), "4", "5")
    assert pairs[0].source.endswith("p.jsonl:1") and list(stats.formats.values()) == [expected_format]


def test_multi_turn_prompt_with_system_and_history(tmp_path):
    record = {"instruction": "and 3+3?", "system": "Be brief.", "history": [["2+2?", "4"]],
              "chosen": "6", "rejected": "7"}
    pairs, _ = load_preference_pairs(write_jsonl(tmp_path / "p.jsonl", [record]))
    assert pairs[0].prompt_messages == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"}]
    assert pairs[0].messages("6")[-1] == {"role": "assistant", "content": "6"}


def test_identical_and_out_of_order_pairs_are_skipped_and_counted(tmp_path):
    records = [FORMATS["trl-strings"][1], {"prompt": "hi", "chosen": "a", "rejected": "a"},
               {"prompt": [{"role": "assistant", "content": "hi"}], "chosen": "a", "rejected": "b"},
               {"prompt": "x", "chosen": "4", "rejected": "5"}]
    file = write_jsonl(tmp_path / "prefs.jsonl", records)
    pairs, stats = load_preference_pairs(file)
    assert [p.prompt[0][1] for p in pairs] == ["2+2?", "x"]
    assert (stats.records, stats.kept, stats.identical, stats.bad_roles) == (4, 2, 1, 1)
    assert "prefs.jsonl:2: identical" in stats.problems[0] and "roles out of order" in stats.problems[1]
    assert "skipped 1 with identical" in stats.summary()
    with pytest.raises(DataError, match=r"prefs.jsonl:2: chosen and rejected answers are identical"):
        load_preference_pairs(file, on_identical="error")


@pytest.mark.parametrize("record,message", [
    ({"question": "x", "answer": "y"}, r"cannot tell the preference format.*'question', 'answer'.*trl"),
    ({"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
      "rejected": [{"role": "user", "content": "z"}, {"role": "assistant", "content": "c"}]}, "share every message"),
    ({"prompt": "x", "chosen": 3, "rejected": "b"}, "expected a list of messages"),
    ({"prompt": "x", "chosen": [{"role": "user", "content": "b"}], "rejected": "b"}, "one assistant message"),
])
def test_malformed_records_name_file_line_and_reason(tmp_path, record, message):
    first = {"chosen": [*PROMPT, {"role": "assistant", "content": "4"}],
             "rejected": [*PROMPT, {"role": "assistant", "content": "5"}]}
    file = write_jsonl(tmp_path / "bad.jsonl", [record] if "question" in record else [first, record])
    if "question" not in record and "prompt" in record:
        file = write_jsonl(tmp_path / "bad.jsonl", [FORMATS["trl-strings"][1], record])
    with pytest.raises(DataError, match=r"bad.jsonl:\d: .*" + message):
        load_preference_pairs(file)


def test_invalid_json_names_the_line(tmp_path):
    file = tmp_path / "broken.jsonl"
    file.write_text(json.dumps(FORMATS["alpaca"][1]) + "\n{not json\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"broken.jsonl:2: not valid JSON"):
        load_preference_pairs(file)


# --- the stage end to end on a tiny model ---

def write_tiny_checkpoint(directory, seed: int = 0, tokenizer_dir=None):
    """A tiny random 'pretrained' checkpoint with a BPE tokenizer trained on the synthetic tasks' chats."""
    from acornlm.data.chat import chat_text
    from acornlm.data.tasks import make_dataset
    from acornlm.model import ModelConfig, Transformer
    from acornlm.model.checkpoint import write_model_files
    from acornlm.tokenizer import load_tokenizer, train_tokenizer

    directory.mkdir(parents=True)
    if tokenizer_dir is None:
        tokenizer_dir = directory / "tokenizer-source"
        texts = [chat_text(example.messages()) for example in make_dataset("all", 100, seed=0)]
        train_tokenizer(texts, kind="bpe", vocab_size=300).save(tokenizer_dir)
    tokenizer = load_tokenizer(tokenizer_dir)
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=96, rope_theta=10000.0)
    write_model_files(directory, Transformer(config), {"stage": "test"}, tokenizer_dir=tokenizer_dir)
    return directory


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("dpo") / "init")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is fastest, and the cores are shared
    yield
    torch.set_num_threads(threads)


def tiny_train(**overrides):
    from acornlm.train.config import TrainConfig

    settings = dict(max_steps=6, batch_size=4, seq_len=64, learning_rate=3e-3, min_lr=3e-4, warmup_steps=1,
                    weight_decay=0.0, eval_interval=3, eval_batches=2, save_interval=3, keep_last=5, log_interval=1,
                    progress=False)
    return TrainConfig(**{**settings, **overrides})


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_encoded_pair_masks_only_the_final_answer(tiny_checkpoint):
    from acornlm.data.preferences import PreferencePair, encode_pair
    from acornlm.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tiny_checkpoint)
    pair = PreferencePair.from_messages([{"role": "user", "content": "What is 2 + 2?"},
                                         {"role": "assistant", "content": "4"},
                                         {"role": "user", "content": "What is 3 + 3?"}], "6", "7")
    encoded = encode_pair(tokenizer, pair)
    for ids, mask, answer in ((encoded.chosen_ids, encoded.chosen_mask, "6"),
                              (encoded.rejected_ids, encoded.rejected_mask, "7")):
        assert tokenizer.decode([t for t, m in zip(ids, mask) if m]) == answer + "<|im_end|>"
        assert ids[:encoded.prompt_length] == encoded.chosen_ids[:encoded.prompt_length]  # shared prompt
        assert not any(mask[:encoded.prompt_length])  # the earlier assistant turn is context only


@pytest.mark.parametrize("precompute,lora_rank", [(True, 0), (False, 0), (False, 2)])
def test_dpo_cli_trains_from_the_reference(tiny_checkpoint, tmp_path, precompute, lora_rank):
    from acornlm.cli.align import dpo
    from acornlm.model.checkpoint import load_model
    from acornlm.model.lora import LoraConfig, load_model_with_adapter

    out = tmp_path / "run"
    dpo(init=str(tiny_checkpoint), out=str(out), tasks="arithmetic,reverse", num_pairs=24, train=tiny_train(),
        lora=LoraConfig(rank=lora_rank, alpha=4.0), dpo=DPOConfig(beta=0.5, precompute_reference=precompute))
    records = read_metrics(out)
    # The policy starts as the reference: every implicit reward is 0 and the loss is -log sigmoid(0) = ln 2.
    assert records[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert records[0]["reward_margin"] == pytest.approx(0.0, abs=1e-5)
    for key in ("preference_accuracy", "chosen_reward", "rejected_reward"):
        assert key in records[-1] and "val_" + key in records[-1]
    assert records[-1]["reward_margin"] > 0  # learning: chosen answers gained on rejected ones
    model, info = load_model_with_adapter(out)
    assert info["stage"] == "dpo" and info["init"] == str(tiny_checkpoint)
    if lora_rank:  # the base weights stay those of the reference
        base, _ = load_model(out)
        reference, _ = load_model(tiny_checkpoint)
        assert all(torch.equal(a, b) for a, b in zip(base.state_dict().values(), reference.state_dict().values()))


def test_a_stage_after_lora_sft_starts_from_base_plus_adapter(tiny_checkpoint, tmp_path):
    """DPO and GRPO from a LoRA SFT run start from (and compare with) what SFT learned: the
    adapter merged into the base, not the frozen base stored next to the adapter."""
    from acornlm.model.checkpoint import load_model
    from acornlm.model.lora import (
        LoraConfig,
        apply_lora,
        load_model_with_adapter,
        lora_layers,
        write_lora_checkpoint,
    )
    from acornlm.train.distributed import DistributedContext
    from acornlm.train.stage import build_policy, load_reference, resolve_start

    model, _ = load_model(tiny_checkpoint)
    apply_lora(model, LoraConfig(rank=2, alpha=4.0))
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.normal_()  # a trained adapter is not zero
    sft = tmp_path / "sft"
    sft.mkdir()
    write_lora_checkpoint(sft, model, {"stage": "sft"}, tokenizer_dir=tiny_checkpoint)
    x = torch.randint(0, model.config.vocab_size, (2, 12))
    adapted, _ = load_model_with_adapter(sft)
    expected = adapted(x)
    assert not torch.allclose(expected, load_model(sft)[0](x), atol=1e-4)  # the base alone differs
    for lora in (LoraConfig(), LoraConfig(rank=2, alpha=4.0)):
        start = resolve_start(sft, tmp_path / "run", False, lora, tiny_train())
        policy = build_policy(start, tiny_train(), DistributedContext(), "dpo").eval()
        with torch.no_grad():
            torch.testing.assert_close(policy(x), expected, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(load_reference(start)(x), expected, atol=1e-5, rtol=1e-5)
        trainable = {name for name, p in policy.named_parameters() if p.requires_grad}
        assert all("lora_" in name for name in trainable) if lora.enabled else len(trainable) > 0


def test_dpo_resume_is_bitwise_identical(tiny_checkpoint, tmp_path):
    import shutil

    from acornlm.cli.align import dpo
    from acornlm.train.metrics import TIMING_FIELDS

    settings = dict(init=str(tiny_checkpoint), tasks="arithmetic", num_pairs=24, train=tiny_train())
    straight = tmp_path / "straight"
    dpo(out=str(straight), **settings)
    # A run that stopped after its step-3 checkpoint: copy that state, then resume it.
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(straight / "checkpoints" / "step-0000003", resumed / "checkpoints" / "step-0000003")
    (resumed / "checkpoints" / "latest").write_text("step-0000003\n")
    (resumed / "metrics.jsonl").write_text("".join(line + "\n" for line in
                                                   (straight / "metrics.jsonl").read_text().splitlines()[:3]))
    dpo(out=str(resumed), resume=True, **settings)
    final = "checkpoints/step-0000006/model.safetensors"
    assert (straight / final).read_bytes() == (resumed / final).read_bytes()

    def without_timing(run):
        return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in read_metrics(run)]
    assert without_timing(straight) == without_timing(resumed)


def test_dpo_identical_pairs_error_on_request(tiny_checkpoint, tmp_path):
    from acornlm.cli.align import dpo

    data = write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": "hi", "chosen": "a", "rejected": "a"}] * 3)
    with pytest.raises(DataError, match="no usable preference pair.*3 skipped"):
        dpo(data=str(data), init=str(tiny_checkpoint), out=str(tmp_path / "run"), train=tiny_train())
    with pytest.raises(DataError, match="prefs.jsonl:1: chosen and rejected answers are identical"):
        dpo(data=str(data), init=str(tiny_checkpoint), out=str(tmp_path / "run"), train=tiny_train(),
            on_identical="error")


def test_dpo_through_the_command_line(tiny_checkpoint, tmp_path, capsys):
    from acornlm.cli import main

    out = tmp_path / "run"
    main(["train", "dpo", "--init", str(tiny_checkpoint), "--out", str(out), "--tasks", "sort", "--num-pairs", "16",
          "--dpo.loss_type", "ipo", "--dpo.beta", "0.5", "--lora.rank", "2", "--lora.targets", "q_proj,v_proj",
          "--train.max_steps", "2", "--train.batch_size", "2", "--train.seq_len", "64", "--train.eval_interval", "2",
          "--train.eval_batches", "1", "--train.progress", "false"])
    assert "held-out preference accuracy" in capsys.readouterr().err
    assert (out / "checkpoints" / "step-0000002" / "adapter_config.json").is_file()
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "dpo", "--init", str(tiny_checkpoint), "--out", str(tmp_path / "x"), "--tasks", "sort",
              "--dpo.label_smoothing", "0.2", "--dpo.loss_type", "ipo", "--train.seq_len", "64"])
    assert exit_info.value.code == 2 and "label_smoothing applies to the sigmoid" in capsys.readouterr().err


def test_rpo_adds_the_chosen_answers_nll_per_token_to_dpo():
    from acornlm.train.dpo import DPOLoss

    torch.manual_seed(0)
    logits = torch.randn(4, 6, 11, requires_grad=True)  # 2 pairs: rows 0-1 chosen, 2-3 rejected
    targets = torch.randint(0, 11, (4, 6))
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 0, 0, 0], [0, 0, 1, 1, 0, 0], [0, 1, 1, 1, 1, 0]])
    reference = torch.tensor([-9.0, -5.0, -7.0, -11.0])
    batch = {"input_ids": torch.zeros(4, 6, dtype=torch.long), "targets": targets, "mask": mask,
             "reference_logps": reference}

    class Fixed(torch.nn.Module):
        training = True

        def forward(self, ids):
            return logits

    plain = DPOLoss(beta=0.1)(Fixed(), batch)
    rpo = DPOLoss(beta=0.1, sft_weight=0.5)(Fixed(), batch)
    chosen_nll = -sequence_logprobs(logits[:2], targets[:2], mask[:2], average=True).mean()
    assert rpo.item() == pytest.approx(plain.item() + 0.5 * chosen_nll.item(), rel=1e-6)
    assert DPOConfig(sft_weight=1.0).sft_weight == 1.0
    for bad in (-0.1, float("inf"), float("nan")):
        with pytest.raises(ConfigError, match="sft_weight"):
            check_dpo_settings(0.1, 0.0, "sigmoid", bad)
