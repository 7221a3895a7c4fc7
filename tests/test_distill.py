"""Distillation: the temperature-scaled KL against a hand computation, alpha mixing, the stage."""

from __future__ import annotations

import json
import math

import pytest
import torch

from acornlm.errors import ConfigError
from acornlm.train.distill import check_distill_settings, distillation_loss
from acornlm.train.losses import distillation_kl, masked_cross_entropy


def softmax(values, temperature):
    exps = [math.exp(v / temperature) for v in values]
    return [e / sum(exps) for e in exps]


def test_distillation_kl_equals_hand_computation():
    student = torch.tensor([[[1.0, 0.0, -1.0], [0.5, 0.5, 0.0], [3.0, 0.0, 0.0]]])
    teacher = torch.tensor([[[0.0, 2.0, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 9.0]]])
    mask = torch.tensor([[1, 1, 0]])  # the last position is not an assistant token
    temperature = 2.0
    kls = []
    for t in range(2):
        p = softmax(teacher[0, t].tolist(), temperature)
        q = softmax(student[0, t].tolist(), temperature)
        kls.append(sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q)))
    expected = temperature ** 2 * sum(kls) / 2
    assert distillation_kl(student, teacher, mask, temperature).item() == pytest.approx(expected, rel=1e-6)
    assert kls[1] == pytest.approx(0.0, abs=1e-9)  # identical distributions: no divergence
    assert distillation_kl(teacher, teacher, mask, temperature).item() == pytest.approx(0.0, abs=1e-6)


def test_alpha_mixes_soft_and_hard_losses():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 4, 5), torch.randn(2, 4, 5)
    targets = torch.randint(0, 5, (2, 4))
    mask = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1]])
    soft = distillation_kl(student, teacher, mask, 3.0)
    hard = masked_cross_entropy(student, targets, mask)
    mixed = distillation_loss(student, teacher, targets, mask, temperature=3.0, alpha=0.25)
    assert mixed.item() == pytest.approx(0.25 * soft.item() + 0.75 * hard.item(), rel=1e-6)
    assert distillation_loss(student, teacher, targets, mask, 3.0, alpha=0.0).item() == pytest.approx(hard.item())
    # the hard loss counts masked tokens only
    picked = [-torch.log_softmax(student[b, t], -1)[targets[b, t]].item()
              for b in range(2) for t in range(4) if mask[b, t]]
    assert hard.item() == pytest.approx(sum(picked) / len(picked), rel=1e-6)


@pytest.mark.parametrize("temperature,alpha", [(0.0, 0.5), (1.0, 1.5), (-1.0, 0.5)])
def test_impossible_settings_are_config_errors(temperature, alpha):
    with pytest.raises(ConfigError):
        check_distill_settings(temperature, alpha)


# --- the stage on tiny models ---

@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A teacher and a student with the same tokenizer (different random weights), and chat data."""
    from acornlm.data.chat import chat_text
    from acornlm.data.tasks import make_dataset, write_jsonl
    from acornlm.model import ModelConfig, Transformer
    from acornlm.model.checkpoint import write_model_files
    from acornlm.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("distill")
    examples = make_dataset("arithmetic,reverse", 60, seed=0)
    tokenizer = train_tokenizer([chat_text(e.messages()) for e in examples], kind="bpe", vocab_size=300)
    tokenizer.save(root / "tokenizer")
    paths = {}
    for name, seed, width in (("teacher", 1, 48), ("student", 2, 32)):
        torch.manual_seed(seed)
        config = ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=width, intermediate_size=2 * width,
                             num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=96,
                             rope_theta=10000.0, initializer_range=0.2 if name == "teacher" else 0.02)
        (root / name).mkdir()
        write_model_files(root / name, Transformer(config), {"stage": "test"}, tokenizer_dir=root / "tokenizer")
        paths[name] = root / name
    paths["data"] = write_jsonl(examples, root / "chats.jsonl")
    return paths


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is fastest, and the cores are shared
    yield
    torch.set_num_threads(threads)


def kl_to_teacher(student_dir, teacher_dir, data) -> float:
    """KL(teacher || student) at T=1 on the assistant tokens of the first chats."""
    from acornlm.data.conversations import load_conversations
    from acornlm.data.sft import IGNORE_INDEX, encode_conversations, row_tensors
    from acornlm.model.checkpoint import load_model
    from acornlm.tokenizer import load_tokenizer

    student, _ = load_model(student_dir)
    teacher, _ = load_model(teacher_dir)
    chats, _ = load_conversations([data])
    examples, _ = encode_conversations(load_tokenizer(teacher_dir), chats[:32], 65)
    inputs, targets = row_tensors([[e] for e in examples], pad_id=0)
    with torch.no_grad():
        return distillation_kl(student(inputs), teacher(inputs), targets != IGNORE_INDEX).item()


def test_distill_cli_moves_the_student_towards_the_teacher(checkpoints, tmp_path):
    from acornlm.cli.align import distill
    from acornlm.train.config import TrainConfig
    from acornlm.train.distill import DistillConfig

    out = tmp_path / "run"
    train = TrainConfig(max_steps=12, batch_size=8, seq_len=64, learning_rate=2e-2, min_lr=2e-3, warmup_steps=1,
                        weight_decay=0.0, eval_interval=6, eval_batches=2, save_interval=6, log_interval=1,
                        progress=False)
    distill(data=str(checkpoints["data"]), teacher=str(checkpoints["teacher"]), init=str(checkpoints["student"]),
            out=str(out), train=train, distill=DistillConfig(temperature=1.0, alpha=1.0))
    before = kl_to_teacher(checkpoints["student"], checkpoints["teacher"], checkpoints["data"])
    after = kl_to_teacher(out, checkpoints["teacher"], checkpoints["data"])
    assert after < 0.9 * before, (before, after)  # training on the labels alone (alpha 0) raises it to ~4x
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["loss"] == pytest.approx(records[0]["kl"], rel=1e-5)  # alpha = 1: the KL term alone
    assert "val_kl" in records[-1] and "val_hard_loss" in records[-1]


def test_teacher_with_another_tokenizer_is_refused(checkpoints, tmp_path):
    from acornlm.cli.align import distill
    from acornlm.model import ModelConfig, Transformer
    from acornlm.model.checkpoint import write_model_files
    from acornlm.tokenizer import train_tokenizer
    from acornlm.train.config import TrainConfig

    tokenizer = train_tokenizer(["a completely different corpus of words"] * 20, kind="char", vocab_size=64)
    tokenizer.save(tmp_path / "tok")
    other = tmp_path / "other"
    other.mkdir()
    config = ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, max_position_embeddings=96)
    write_model_files(other, Transformer(config), {}, tokenizer_dir=tmp_path / "tok")
    with pytest.raises(ConfigError, match="teacher .* uses another tokenizer"):
        distill(data=str(checkpoints["data"]), teacher=str(other), init=str(checkpoints["student"]),
                out=str(tmp_path / "run"), train=TrainConfig(seq_len=64))
