"""SFT: truncation and packing, batches as a pure function of the step, the masked loss, the stage
(learning, LoRA, bitwise resume) and its command line."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from acornlm.data.chat import chat_text, render_chat
from acornlm.data.conversations import Conversation
from acornlm.data.sft import IGNORE_INDEX, SFTBatches, encode_conversations, pack_examples, row_tensors
from acornlm.data.tasks import make_dataset, make_examples, write_jsonl
from acornlm.errors import ConfigError
from acornlm.eval.tasks import evaluate_tasks
from acornlm.infer.api import LanguageModel
from acornlm.model import ModelConfig, Transformer
from acornlm.model.checkpoint import write_model_files
from acornlm.model.lora import ADAPTER_WEIGHTS_FILE, LoraConfig, load_model_with_adapter
from acornlm.tokenizer import load_tokenizer, train_tokenizer
from acornlm.train.config import TrainConfig
from acornlm.train.losses import assistant_token_loss
from acornlm.train.metrics import TIMING_FIELDS
from acornlm.train.sft import run_sft
from acornlm.train.trainer import seed_everything


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    texts = [chat_text(e.messages()) for e in make_dataset("all", 200, seed=0)]
    tok = train_tokenizer(texts, kind="bpe", vocab_size=512)
    directory = tmp_path_factory.mktemp("sft-tokenizer")
    tok.save(directory)
    return tok


@pytest.fixture(scope="module")
def init_checkpoint(tmp_path_factory, tokenizer):
    """A tiny random "pretrained" model saved as a checkpoint, with the tokenizer."""
    root = tmp_path_factory.mktemp("sft-init")
    tokenizer.save(root / "tok")
    seed_everything(0)
    model = Transformer(ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128,
                                    num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64,
                                    rope_theta=10000.0, dropout=0.1))
    init = root / "init"
    init.mkdir()
    write_model_files(init, model, info={"stage": "pretrain"}, tokenizer_dir=root / "tok")
    return init


def conversation(*turns: str) -> Conversation:
    roles = ["user", "assistant"] * len(turns)
    return Conversation([{"role": r, "content": t} for r, t in zip(roles, turns)], "test")


def train_config(**overrides) -> TrainConfig:
    fields = dict(max_steps=6, batch_size=4, seq_len=48, learning_rate=3e-3, min_lr=3e-4, warmup_steps=2,
                  weight_decay=0.0, eval_interval=3, eval_batches=2, save_interval=3, keep_last=5,
                  log_interval=1, progress=False, device="cpu")
    return TrainConfig(**(fields | overrides))


# --- truncation, packing, batches ---

def test_truncation_never_cuts_the_prompt_silently(tokenizer):
    short = conversation("Hi", "Hello")
    long_reply = conversation("Hi", "word " * 40)
    long_prompt = conversation("word " * 40, "ok")
    two_turns = conversation("Hi", "Hello", "word " * 40, "ok")
    chats = [short, long_reply, long_prompt, two_turns]
    max_tokens = 24

    examples, stats = encode_conversations(tokenizer, chats, max_tokens, "truncate")
    assert (stats.conversations, stats.kept, stats.truncated, stats.dropped_too_long) == (4, 3, 2, 1)
    assert "2 truncated and 1 dropped" in stats.summary()
    assert examples[0] == render_chat(tokenizer, short.messages)  # short ones untouched
    for example, chat in zip(examples[1:], (long_reply, two_turns)):
        full = render_chat(tokenizer, chat.messages)
        assert len(example) <= max_tokens and example.loss_mask[-1] == 1  # ends on a trained token
        assert example.ids == full.ids[:len(example)]  # a prefix: the prompt is whole
    # the second conversation's first turn survives whole, its too-long second prompt is cut away
    assert tokenizer.decode([t for t, m in zip(examples[2].ids, examples[2].loss_mask) if m]) == "Hello<|im_end|>"
    assert stats.target_tokens == sum(e.num_targets for e in examples)

    dropped, stats = encode_conversations(tokenizer, chats, max_tokens, "drop")
    assert (stats.kept, stats.truncated, stats.dropped_too_long) == (1, 0, 3)
    assert dropped == examples[:1]
    with pytest.raises(ConfigError, match="truncation"):
        encode_conversations(tokenizer, chats, max_tokens, "cut")


def test_packing_keeps_examples_whole_and_targets_exact(tokenizer):
    chats = [Conversation(e.messages(), "t") for e in make_dataset("all", 6, seed=1)]
    examples, _ = encode_conversations(tokenizer, chats, 49, "truncate")
    rows = pack_examples(examples, 49)
    assert [e for row in rows for e in row] == examples  # every example once, whole, in order
    assert all(sum(len(e) for e in row) <= 49 for row in rows)
    assert len(rows) < len(examples)
    inputs, targets = row_tensors(rows, pad_id=tokenizer.eot_id, length=49)
    assert inputs.shape == targets.shape == (len(rows), 48)
    for i, row in enumerate(rows):
        ids = [t for e in row for t in e.ids]
        mask = [m for e in row for m in e.loss_mask]
        expected = [ids[t + 1] if mask[t + 1] else IGNORE_INDEX for t in range(len(ids) - 1)]
        expected += [IGNORE_INDEX] * (48 - len(expected))
        assert targets[i].tolist() == expected
        assert inputs[i, :len(ids) - 1].tolist() == ids[:-1]
    assert (targets != IGNORE_INDEX).sum().item() == sum(e.num_targets for e in examples)


def test_batches_are_a_pure_function_of_the_step_and_split_across_ranks(tokenizer):
    chats = [Conversation(e.messages(), "t") for e in make_dataset("all", 8, seed=2)]
    examples, _ = encode_conversations(tokenizer, chats, 49, "truncate")

    def source(**kw):
        return SFTBatches(examples, examples[:3], batch_size=2, seed=5, row_tokens=49, **kw)

    one = source(grad_accum_steps=2)
    again = source(grad_accum_steps=2)
    for step in (0, 7, 30):  # step 30 is several epochs in
        for micro in (0, 1):
            assert all(torch.equal(a, b) for a, b in zip(one.batch(step, micro), again.batch(step, micro)))
    ranks = [source(rank=r, world_size=2) for r in (0, 1)]
    for step in (0, 3):  # two ranks x 1 micro-batch see what one rank x 2 micro-batches sees
        single = [one.batch(step, m)[1] for m in (0, 1)]
        split = [ranks[r].batch(step, 0)[1] for r in (0, 1)]
        assert [t.tolist() for t in single] == [t.tolist() for t in split]
    # one epoch visits every row once
    epoch = [i for step in range(len(one) // 4) for i in one._row_indices(step).tolist()]
    assert sorted(epoch) == list(range(len(epoch))) and len(epoch) == len(one) - len(one) % 4
    assert torch.equal(one.eval_batch(1)[0], source().eval_batch(1)[0])
    packed = source(packing=True)
    assert packed.batch(0, 0)[0].shape == (2, 48) and len(packed) < len(one)


def test_assistant_token_loss_is_the_mean_over_assistant_tokens():
    seed_everything(0)
    model = Transformer(ModelConfig(vocab_size=20, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                    num_attention_heads=2, max_position_embeddings=16))
    inputs = torch.randint(0, 20, (2, 8))
    targets = torch.randint(0, 20, (2, 8))
    targets[0, :5] = IGNORE_INDEX
    targets[1, 2:] = IGNORE_INDEX
    log_probs = F.log_softmax(model(inputs).float(), dim=-1)
    picked = [log_probs[b, t, targets[b, t]] for b in range(2) for t in range(8) if targets[b, t] != IGNORE_INDEX]
    expected = -torch.stack(picked).mean()
    torch.testing.assert_close(assistant_token_loss(model, (inputs, targets)), expected)


# --- the stage ---

def test_sft_teaches_the_identity_answer(tmp_path, init_checkpoint):
    data = write_jsonl(make_examples("identity", 300, seed=0), tmp_path / "identity.jsonl")
    tok = load_tokenizer(init_checkpoint)
    before = evaluate_tasks(LanguageModel(*_load(init_checkpoint), ), "identity", n=10)
    assert before == {"identity": 0.0}
    config = train_config(max_steps=60, batch_size=8, eval_interval=0, save_interval=0, log_interval=10)
    summary = run_sft(data, init_checkpoint, tmp_path / "sft", config, packing=True)
    assert summary["steps"] == 60 and summary["trainable_params"] == summary["params"]
    assert summary["data"]["encode"]["truncated"] == 0 and summary["data"]["val_examples"] == 15
    model, _ = load_model_with_adapter(tmp_path / "sft")
    after = evaluate_tasks(LanguageModel(model, tok), "identity", n=10)
    assert after["identity"] >= 0.9  # held-out phrasings of the question


def _load(path):
    model, info = load_model_with_adapter(path)
    return model, load_tokenizer(path), info


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_sft_resume_is_bitwise_identical(tmp_path, init_checkpoint, lora_rank):
    """Run 6 steps saving at 3 and 6; roll `latest` back to step 3 (what a crash after that save
    leaves) and resume: step 6 must come out bit for bit the same."""
    data = write_jsonl(make_dataset("all", 30, seed=0), tmp_path / "tasks.jsonl")
    lora = LoraConfig(rank=lora_rank, alpha=8, dropout=0.1) if lora_rank else LoraConfig()
    run = tmp_path / "run"
    run_sft(data, init_checkpoint, run, train_config(), lora)
    final = run / "checkpoints" / "step-0000006"
    files = ["model.safetensors"] + ([ADAPTER_WEIGHTS_FILE] if lora_rank else [])
    straight = {name: load_file(final / name) for name in files}
    straight_state = torch.load(final / "train_state.pt", weights_only=True)
    straight_metrics = _metrics(run)
    shutil.copytree(final, tmp_path / "kept")

    (run / "checkpoints" / "latest").write_text("step-0000003\n")
    summary = run_sft(data, None, run, train_config(), LoraConfig(), resume=True)
    assert summary["steps"] == 6
    for name, tensors in straight.items():
        resumed = load_file(final / name)
        assert resumed.keys() == tensors.keys()
        assert all(torch.equal(resumed[k], tensors[k]) for k in tensors), name
    state = torch.load(final / "train_state.pt", weights_only=True)
    for param_id, moments in straight_state["optimizer"]["state"].items():
        for key, tensor in moments.items():
            assert torch.equal(tensor, state["optimizer"]["state"][param_id][key])
    assert _metrics(run) == straight_metrics
    config = json.loads((final / "config.json").read_text())
    assert config["stage"] == "sft" and config["init"] == str(init_checkpoint)
    if lora_rank:  # only the adapters were optimised, and the base is the init model
        assert len(state["optimizer"]["state"]) == 2 * 7 * 2
        init_weights = load_file(init_checkpoint / "model.safetensors")
        assert all(torch.equal(straight["model.safetensors"][k], v) for k, v in init_weights.items())
        assert config["lora"]["rank"] == lora_rank


def _metrics(run) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_FIELDS} for line in lines]


def test_bad_settings_are_refused_before_training(tmp_path, init_checkpoint):
    data = write_jsonl(make_dataset("sort", 5, seed=0), tmp_path / "d.jsonl")
    with pytest.raises(ConfigError, match="--init is required"):
        run_sft(data, None, tmp_path / "a", train_config())
    with pytest.raises(ConfigError, match="max_position_embeddings"):
        run_sft(data, init_checkpoint, tmp_path / "b", train_config(seq_len=100))
    run_sft(data, init_checkpoint, tmp_path / "c", train_config(max_steps=1, save_interval=0, eval_interval=0))
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        run_sft(data, init_checkpoint, tmp_path / "c", train_config(max_steps=1))
    with pytest.raises(ConfigError, match="LoRA"):
        run_sft(data, None, tmp_path / "c", train_config(max_steps=2), LoraConfig(rank=2), resume=True)


# --- the command line ---

def run_cli(argv: list[str]) -> None:
    """`acornlm ...` in-process (registering the fine-tuning commands if the CLI does not have them yet)."""
    from jsonargparse import CLI

    from acornlm.cli import build_commands, finetune, normalize_argv

    commands = build_commands()
    commands.setdefault("train", {}).setdefault("sft", finetune.sft)
    commands.setdefault("lora", {}).setdefault("merge", finetune.lora_merge)
    commands.setdefault("eval", {}).setdefault("tasks", finetune.eval_tasks)
    commands.setdefault("data", {}).setdefault("synth", finetune.synth)
    CLI(commands, args=normalize_argv(argv), prog="acornlm", as_positional=False)


def test_cli_synth_sft_with_lora_and_eval(tmp_path, init_checkpoint, capsys):
    run_cli(["data", "synth", "--out", str(tmp_path / "t.jsonl"), "--tasks", "reverse,sort", "--n", "20"])
    lines = (tmp_path / "t.jsonl").read_text().splitlines()
    assert len(lines) == 40 and json.loads(lines[0])["messages"][1]["role"] == "assistant"
    run_cli(["train", "sft", "--data", str(tmp_path / "t.jsonl"), "--init", str(init_checkpoint),
             "--out", str(tmp_path / "run"), "--lora.rank", "2", "--lora.targets", "q_proj,down_proj",
             "--packing", "--train.max_steps", "2", "--train.seq_len", "48", "--train.batch_size", "4",
             "--train.progress", "false", "--train.device", "cpu"])
    err = capsys.readouterr().err
    assert "trainable parameters" in err and "examples kept" in err
    adapter = json.loads((tmp_path / "run" / "checkpoints" / "step-0000002" / "adapter_config.json").read_text())
    assert adapter["target_modules"] == ["down_proj", "q_proj"] and adapter["r"] == 2
    run_cli(["eval", "tasks", "--ckpt", str(tmp_path / "run"), "--tasks", "sort", "--n", "3", "--json-output"])
    assert set(json.loads(capsys.readouterr().out)) == {"sort"}
    with pytest.raises(ConfigError, match="--data is required"):
        run_cli(["train", "sft", "--out", str(tmp_path / "x")])
