"""`acornlm demo-agent`: the proof that tool calling, thinking and RLHF work, offline on a CPU.

tokenizer -> a fresh model (or --init) -> evaluate -> SFT on tool and reasoning chats -> evaluate ->
agentic GRPO (the model calls its tool, acornlm runs it) -> evaluate -> a reward model ->
PPO against GRPO on the reward model, same start, same minutes -> summary.md and figures.json.

The tasks (acornlm/data/agent_tasks.py): `price` needs the tool, since every question has its own
price list; `add` (three-digit addition) can be answered with or without a written scratchpad.
The reward model learns that an answer must agree with the scratchpad before it (chosen: the
scratchpad's sum; rejected: another number), which is what RLHF then optimises on `add`.
Each step is the function the individual commands call; this file only wires them and sizes them
to the time budget.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

from acornlm.cli.demo_budget import estimate_steps, say
from acornlm.cli.tokenizer import add_chat_tokens
from acornlm.data.agent_tasks import addition_scratchpad, make_agent_examples
from acornlm.data.chat import chat_text
from acornlm.errors import ConfigError
from acornlm.eval.agent import evaluate_agent
from acornlm.files import atomic_write_text
from acornlm.model import ModelConfig, Transformer
from acornlm.model.checkpoint import load_model, resolve_checkpoint, write_model_files
from acornlm.presets import load_preset
from acornlm.tokenizer import Tokenizer, load_tokenizer, train_tokenizer
from acornlm.train.config import TrainConfig
from acornlm.train.grpo import GRPOConfig, run_grpo
from acornlm.train.ppo import PPOConfig, run_ppo
from acornlm.train.reward import run_reward
from acornlm.train.sft import run_sft
from acornlm.train.trainer import seed_everything

# Shares of the budget per training stage; the evaluations take the rest (about a fifth).
SHARES = {"sft": 0.45, "grpo": 0.12, "reward": 0.06, "ppo": 0.08, "grpo_rm": 0.08}
DIGIT = re.compile(r"\d")
RUNS = ("base", "sft", "grpo", "reward", "ppo", "grpo-rm")
VOCAB_SIZE = 512  # the task chats hold little else: no digit merges, ~630 tokens at most
# per task: price is learned fast (a format and a copy), addition needs the data
SFT_EXAMPLES = {"price": 3000, "add": 9000}
SEQ_LEN = 256           # a price chat: ~170 tokens of tools in the system turn, then the question and turns
PAIRS = 2000            # reward-model pairs; 10% held out
RL_EVAL_PROMPTS = 64    # held-out prompts whose greedy answers the reward model scores after PPO / GRPO
MAX_NEW_TOKENS = 72     # a scratchpad of four lines, then the answer


def ensure_agent_tokenizer(out_dir: Path) -> Tokenizer:
    """A BPE tokenizer trained on the task chats (reused when OUT/tokenizer has the chat tokens).

    It never merges two digits: it learns from the chats with a space after every digit, so "487"
    is read as 4, 8, 7 (as LLaMA's tokenizer splits numbers). Column addition and copying a price
    need the digits one by one; a token "487" would hide them.
    """
    tok_dir = out_dir / "tokenizer"
    if (tok_dir / "tokenizer.json").is_file():
        tokenizer = load_tokenizer(tok_dir)
        if not tokenizer.missing_chat_tokens and tokenizer.vocab_size == VOCAB_SIZE \
                and len(tokenizer.encode("487")) == 3:
            say(f"      reusing {tok_dir}")
            return tokenizer
    texts = [DIGIT.sub(r"\g<0> ", chat_text(e.messages, tools=e.tools)) for task in ("price", "add")
             for e in make_agent_examples(task, 2000, seed=1)]
    tokenizer = train_tokenizer(texts, "bpe", VOCAB_SIZE)
    tokenizer.save(tok_dir)
    return tokenizer


def base_model(out_dir: Path, init: str | None, preset: str, seed: int) -> tuple[Path, ModelConfig]:
    """The checkpoint fine-tuning starts from: --init (gaining the chat tokens if it lacks them), or a
    fresh model of the preset with the task tokenizer."""
    base = out_dir / "base"
    if init is not None:
        source = resolve_checkpoint(init)
        if not load_tokenizer(source).missing_chat_tokens:
            return source, load_model(source)[0].config
        say(f"      {source}'s tokenizer lacks the chat tokens: adding them (acornlm tokenizer add-chat-tokens)")
        add_chat_tokens(str(source), str(base))
        return base, load_model(base)[0].config
    tokenizer = ensure_agent_tokenizer(out_dir)
    preset_data = load_preset(preset)
    config = ModelConfig(**{**preset_data.get("model", {}), "vocab_size": tokenizer.vocab_size})
    seed_everything(seed)
    base.mkdir(parents=True, exist_ok=True)
    write_model_files(base, Transformer(config), info={"stage": "init", "preset": preset},
                      tokenizer_dir=out_dir / "tokenizer")
    return base, config


def write_sft_data(path: Path, seed: int) -> Path:
    """Tool-use chats (price) and addition chats, half of them thinking, in the OpenAI messages format."""
    rows = [{"messages": e.messages, **({"tools": e.tools} if e.tools else {})}
            for task in ("price", "add") for e in make_agent_examples(task, SFT_EXAMPLES[task], seed)]
    random.Random(seed).shuffle(rows)
    atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return path


def write_preference_pairs(path: Path, n: int, seed: int) -> Path:
    """Pairs for the reward model on `add`: the same scratchpad, then its own sum (chosen) or another
    number (rejected). A reward model that learns this checks answers against their reasoning."""
    rng = random.Random(f"pairs/{seed}")
    rows = []
    for example in make_agent_examples("add", n, seed + 1):
        a, b = (int(x) for x in example.prompt.removeprefix("What is ").rstrip("?").split(" + "))
        scratch = addition_scratchpad(a, b)
        wrong = a + b + rng.choice([-100, -10, -1, 1, 10, 100])
        rows.append({"prompt": [{"role": "user", "content": example.prompt}],
                     "chosen": f"<think>\n{scratch}\n</think>\n\n{a + b}",
                     "rejected": f"<think>\n{scratch}\n</think>\n\n{wrong}"})
    atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in rows))
    return path


def evaluate(label: str, run: Path, tasks: list[str], n: int, seed: int) -> dict[str, Any]:
    checkpoint = resolve_checkpoint(run)
    model, _ = load_model(checkpoint)
    start = time.perf_counter()
    figures = evaluate_agent(model, load_tokenizer(checkpoint), tasks, n=n, seed=seed)
    figures["seconds"] = round(time.perf_counter() - start, 1)
    parts = []
    if "price" in figures:
        p = figures["price"]
        parts.append(f"price: valid call {p['tool_call_valid']:.2f}, right call {p['tool_call_right']:.2f}, "
                     f"answer {p['accuracy']:.2f}")
    if "add" in figures:
        a = figures["add"]
        parts.append(f"add: thinking {a['accuracy_thinking']:.2f}, no thinking {a['accuracy_no_thinking']:.2f}")
    say(f"      {label} (n={n} held out each): " + "; ".join(parts))
    return figures


def stage_train(seq_len: int, minutes: float, **overrides: Any) -> TrainConfig:
    settings = dict(max_steps=100_000, max_minutes=minutes, batch_size=8, seq_len=seq_len, learning_rate=1e-5,
                    min_lr=1e-5, warmup_steps=2, weight_decay=0.0, eval_interval=0, eval_batches=2,
                    save_interval=0, log_interval=5, progress=False)
    return TrainConfig(**{**settings, **overrides})


def demo_agent(out: str = "runs/demo-agent", minutes: float = 20.0, init: str | None = None,
               preset: str = "cpu-demo", eval_examples: int = 100, seed: int = 0, device: str = "auto") -> None:
    """Train a model to call a tool and to think, then compare PPO and GRPO on a reward model: offline, with figures.

    Builds a task tokenizer and a fresh model of PRESET (or starts from --init), measures it, fine-tunes
    it on tool-use chats (a `price` tool whose answers change with every question) and addition chats
    with scratchpads (half thinking, half not), measures again, runs agentic GRPO (the model calls the
    tool during training, acornlm runs it, the final answer is rewarded) and measures again. Then trains
    a reward model that prefers answers agreeing with their scratchpad, and runs PPO and GRPO on it from
    the same SFT model for the same minutes. Prints and writes OUT/summary.md and OUT/figures.json:
    tool-call validity and answer accuracy before SFT, after SFT and after GRPO; addition accuracy with
    thinking on and off; the reward model's held-out pair accuracy; PPO's and GRPO's reward and accuracy.

    Args:
        out: Directory for everything it writes (tokenizer/, base/, sft/, grpo/, reward/, ppo/, grpo-rm/, summary.md, figures.json); the tokenizer is reused, the runs are replaced.
        minutes: Wall-clock budget of the training stages together (the evaluations come on top, about 3 minutes for 100 examples).
        init: Start from this checkpoint instead of a fresh model (e.g. runs/demo/run); its tokenizer gains the chat tokens if it lacks them.
        preset: The model of a fresh start.
        eval_examples: Held-out questions per task and evaluation.
        seed: Seed of data, initialisation and sampling.
        device: "auto", "cpu" or "cuda".
    """
    if minutes <= 0 or eval_examples < 1:
        raise ConfigError(f"--minutes must be > 0 and --eval_examples >= 1, got {minutes} and {eval_examples}")
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    for run in RUNS:  # the tokenizer is reused; the runs are replaced
        shutil.rmtree(out_dir / run, ignore_errors=True)
    begin = time.perf_counter()
    stage_minutes = {name: minutes * share / sum(SHARES.values()) for name, share in SHARES.items()}
    figures: dict[str, Any] = {"minutes": minutes, "eval_examples": eval_examples}
    timings: dict[str, float] = {}

    seq_len = SEQ_LEN

    def timed(name: str, function, *args, **kwargs):
        start = time.perf_counter()
        result = function(*args, **kwargs)
        timings[name] = round(time.perf_counter() - start, 1)
        return result

    say("[1/7] tokenizer and base model")
    base, model_config = base_model(out_dir, init, preset, seed)
    say(f"      {base}: {model_config.num_hidden_layers} layers x {model_config.hidden_size}, "
        f"{model_config.vocab_size} tokens")
    seq_len = min(SEQ_LEN, model_config.max_position_embeddings)
    n = eval_examples
    say("[2/7] before fine-tuning")
    figures["before"] = evaluate("before SFT", base, ["price", "add"], n, seed)

    say(f"[3/7] SFT on tool and reasoning chats ({stage_minutes['sft']:.1f} min)")
    data = write_sft_data(out_dir / "sft.jsonl", seed)
    sft_train = stage_train(seq_len, stage_minutes["sft"] * 1.1, batch_size=16, learning_rate=2e-3, min_lr=2e-4,
                            warmup_steps=30, weight_decay=0.1, device=device, seed=seed)
    steps = estimate_steps(model_config, sft_train, stage_minutes["sft"], device)
    sft_train = dataclasses.replace(sft_train, max_steps=steps, log_interval=20)
    sft = timed("sft", run_sft, data, base, out_dir / "sft", sft_train, val_fraction=0.02, packing=True)
    say(f"      {sft['steps']} steps, val loss {sft.get('val_loss', float('nan')):.3f}")
    figures["sft"] = evaluate("after SFT", out_dir / "sft", ["price", "add"], n, seed)

    say(f"[4/7] agentic GRPO: the model calls its tool while it learns ({stage_minutes['grpo']:.1f} min)")
    grpo_train = stage_train(seq_len, stage_minutes["grpo"], learning_rate=2e-5, min_lr=2e-5, device=device, seed=seed)
    grpo_config = GRPOConfig(group_size=8, max_new_tokens=MAX_NEW_TOKENS, temperature=1.0, max_turns=2)
    grpo = timed("grpo", run_grpo, None, out_dir / "sft", out_dir / "grpo", grpo_train, grpo=grpo_config,
                 tasks="price,add", num_prompts=400)
    say(f"      {grpo['steps']} steps")
    figures["grpo"] = evaluate("after GRPO", out_dir / "grpo", ["price", "add"], n, seed)

    say(f"[5/7] a reward model: answers must agree with their scratchpad ({stage_minutes['reward']:.1f} min)")
    pairs = write_preference_pairs(out_dir / "pairs.jsonl", PAIRS, seed)
    # the held-out 10% of the pairs, every one of them scored: batches of 8, as many as there are
    held_out = PAIRS // 10
    reward_train = stage_train(seq_len, stage_minutes["reward"], batch_size=8, eval_batches=held_out // 8,
                               learning_rate=3e-4, min_lr=3e-5,
                               warmup_steps=10, device=device, seed=seed)
    reward = timed("reward", run_reward, pairs, out_dir / "sft", out_dir / "reward", reward_train, val_fraction=0.1)
    figures["reward_model"] = {"val_pair_accuracy": reward.get("val_reward_accuracy"), "steps": reward["steps"],
                               "held_out_pairs": held_out}
    say(f"      {reward['steps']} steps, held-out pair accuracy {reward.get('val_reward_accuracy', float('nan')):.3f}")

    say(f"[6/7] PPO and GRPO on the reward model, from the same SFT model, {stage_minutes['ppo']:.1f} min each")
    rl_train = stage_train(seq_len, stage_minutes["ppo"], learning_rate=2e-5, min_lr=2e-5, device=device, seed=seed,
                           eval_batches=RL_EVAL_PROMPTS // 8)
    ppo = timed("ppo", run_ppo, None, out_dir / "sft", out_dir / "ppo", rl_train, tasks="add", num_prompts=400,
                reward_model=out_dir / "reward",
                ppo=PPOConfig(num_samples=8, max_new_tokens=MAX_NEW_TOKENS, kl_coef=0.02))
    grpo_rm = timed("grpo_rm", run_grpo, None, out_dir / "sft", out_dir / "grpo-rm", rl_train, tasks="add",
                    num_prompts=400, reward_model=out_dir / "reward",
                    grpo=dataclasses.replace(grpo_config, reward=None))
    figures["rlhf"] = {}
    for name, summary, run in (("ppo", ppo, "ppo"), ("grpo", grpo_rm, "grpo-rm")):
        figures["rlhf"][name] = {"steps": summary["steps"], "val_reward": summary.get("val_reward"),
                                 "val_prompts": RL_EVAL_PROMPTS,
                                 "add": evaluate(f"after {name.upper()} on the reward model", out_dir / run,
                                                 ["add"], n, seed)["add"]}

    say("[7/7] summary")
    figures["seconds"] = timings
    figures["total_minutes"] = round((time.perf_counter() - begin) / 60, 1)
    atomic_write_text(out_dir / "figures.json", json.dumps(figures, indent=2) + "\n")
    summary = summary_markdown(figures)
    atomic_write_text(out_dir / "summary.md", summary)
    print(summary)


def summary_markdown(figures: dict[str, Any]) -> str:
    """The demo's figures as a markdown page."""
    n = figures["eval_examples"]
    lines = [f"# acornlm demo-agent: tools, thinking and RLHF ({figures['total_minutes']} min in all)", "",
             f"Held-out questions: {n} per task and evaluation.", "",
             "| model | price: valid call | price: right call | price: answer | add: thinking | add: no thinking |",
             "|---|---|---|---|---|---|"]
    for key, label in (("before", "before SFT"), ("sft", "after SFT"), ("grpo", "after agentic GRPO")):
        p, a = figures[key]["price"], figures[key]["add"]
        lines.append(f"| {label} | {p['tool_call_valid']:.2f} | {p['tool_call_right']:.2f} | {p['accuracy']:.2f} | "
                     f"{a['accuracy_thinking']:.2f} | {a['accuracy_no_thinking']:.2f} |")
    rm = figures["reward_model"]
    accuracy = rm["val_pair_accuracy"]
    lines += ["", f"Reward model: held-out pair accuracy {accuracy:.3f} on {rm['held_out_pairs']} pairs "
              f"({rm['steps']} steps)." if accuracy is not None
              else "Reward model: no held-out accuracy logged.", "",
              "| RLHF from the SFT model, same minutes | steps | held-out reward (reward model, "
              f"{RL_EVAL_PROMPTS} prompts) | add: thinking | add: no thinking |",
              "|---|---|---|---|---|"]
    for name in ("ppo", "grpo"):
        run = figures["rlhf"][name]
        reward = f"{run['val_reward']:.3f}" if run["val_reward"] is not None else "n/a"
        lines.append(f"| {name.upper()} | {run['steps']} | {reward} | {run['add']['accuracy_thinking']:.2f} | "
                     f"{run['add']['accuracy_no_thinking']:.2f} |")
    lines += ["", "Seconds per stage: " + ", ".join(f"{k} {v}" for k, v in figures["seconds"].items()), ""]
    return "\n".join(lines)
