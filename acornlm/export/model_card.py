"""The model card (README.md) of an exported model: what it is, how it was trained, how to use it.

A model card is the first thing people read on the Hugging Face Hub. It states facts the checkpoint
already records (architecture, size, training tokens, validation loss) and nothing it cannot know:
evaluation numbers appear only when the checkpoint holds them.
"""

from __future__ import annotations

import math
from typing import Any

from acornlm.model import ModelConfig


def format_count(value: float) -> str:
    """1234567 -> '1.23M'."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.2f}{unit}"
    return str(int(value))


def feed_forward(c: ModelConfig) -> str:
    if not c.num_experts:
        return f"{c.mlp}, {c.intermediate_size} wide"
    shared = (f" + {c.num_shared_experts} gated shared expert ({c.shared_expert_intermediate_size} wide)"
              if c.num_shared_experts else "")
    return (f"mixture of experts: {c.num_experts} SwiGLU experts ({c.moe_intermediate_size} wide), "
            f"top-{c.num_experts_per_tok} per token{shared}")


def positions(c: ModelConfig) -> str:
    if c.position != "rope":
        return "learned absolute"
    scaling = c.rope_scaling
    if not scaling:
        return f"RoPE, theta {c.rope_theta:g}"
    return (f"RoPE, theta {c.rope_theta:g}, {scaling['rope_type']} scaling x{scaling['factor']:g} "
            f"(trained at {scaling.get('original_max_position_embeddings', '?')} tokens)")


def architecture_rows(config: ModelConfig, architecture: str, parameters: int) -> list[tuple[str, str]]:
    c = config
    attention = f"{c.num_attention_heads} query heads, {c.num_key_value_heads} key/value heads, head dim {c.head_dim}"
    rows = [
        ("transformers class", f"`{architecture}`"),
        ("parameters", f"{format_count(parameters)} ({parameters:,})"),
        ("layers", str(c.num_hidden_layers)),
        ("hidden size", str(c.hidden_size)),
        ("feed-forward", feed_forward(c)),
        ("attention", attention + (", QK-norm" if c.qk_norm else "")),
        ("positions", positions(c)),
        ("normalisation", f"{c.norm} (eps {c.norm_eps:g})"),
        ("context length", f"{c.max_position_embeddings} tokens"),
        ("vocabulary", f"{c.vocab_size} tokens"),
        ("tied embeddings", "yes" if c.tie_word_embeddings else "no"),
    ]
    return rows


def training_rows(info: dict[str, Any]) -> list[tuple[str, str]]:
    """What the checkpoint says about its training (nothing is invented)."""
    rows = []
    if info.get("stage"):
        rows.append(("stage", str(info["stage"])))
    if info.get("data"):
        rows.append(("training data", f"`{info['data']}`"))
    source = info.get("source")
    if isinstance(source, dict) and source.get("path"):
        rows.append(("imported from", f"`{source['path']}` ({source.get('architecture', '?')})"))
    if isinstance(info.get("step"), int):
        rows.append(("optimizer steps", f"{info['step']:,}"))
    if isinstance(info.get("tokens_seen"), int):
        rows.append(("training tokens", f"{format_count(info['tokens_seen'])} ({info['tokens_seen']:,})"))
    val_loss = info.get("val_loss")
    if isinstance(val_loss, (int, float)) and math.isfinite(val_loss):
        rows.append(("validation loss", f"{val_loss:.4f} nats/token (perplexity {math.exp(min(val_loss, 50)):.2f})"))
    train = info.get("train")
    if isinstance(train, dict) and train.get("seq_len"):
        rows.append(("training sequence length", str(train["seq_len"])))
    tokenizer = info.get("tokenizer")
    if isinstance(tokenizer, dict) and tokenizer.get("kind"):
        rows.append(("tokenizer", f"{tokenizer['kind']}, {tokenizer.get('vocab_size', '?')} tokens"))
    for name, value in sorted((info.get("eval") or {}).items()) if isinstance(info.get("eval"), dict) else []:
        rows.append((f"eval: {name}", str(value)))
    return rows


def table(rows: list[tuple[str, str]]) -> list[str]:
    return ["| | |", "|---|---|", *(f"| {key} | {value} |" for key, value in rows)]


def model_card(config: ModelConfig, architecture: str, info: dict[str, Any], summary: dict[str, Any]) -> str:
    """README.md for an export: Hub metadata, architecture, training facts, usage and verification."""
    verification = summary.get("verification")
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        f"tags: [acornlm, {architecture.removesuffix('ForCausalLM').removesuffix('LMHeadModel').lower()}]",
        "---",
        "",
        "# A small language model trained with acornlm",
        "",
        f"Exported by `acornlm export hf` as a standard `{architecture}`: it loads in transformers, vLLM "
        "and other tools without `trust_remote_code`.",
        "",
        "## Architecture",
        "",
        *table(architecture_rows(config, architecture, summary.get("parameters", 0))),
        "",
        "## Training",
        "",
        *(table(training_rows(info)) if training_rows(info) else ["No training information was recorded."]),
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")',
        'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")',
        'inputs = tokenizer("Once upon a time", return_tensors="pt")',
        "output = model.generate(**inputs, max_new_tokens=50, do_sample=True, temperature=0.8, top_k=50)",
        "print(tokenizer.decode(output[0]))",
        "```",
        "",
        f"Weights are stored in {summary.get('dtype', 'float32')}. The tokenizer is byte-level BPE or "
        "character-level with `<|endoftext|>` as document separator; chat models use ChatML "
        "(`tokenizer.apply_chat_template`).",
        "",
        "## Verification",
        "",
    ]
    if verification:
        lines += [
            f"At export, transformers {verification['transformers_version']} loaded these files and was compared "
            "with acornlm on the same weights in float32:",
            "",
            f"- logits on a {verification['prompt_tokens']}-token prompt: max absolute difference "
            f"{verification['logits_max_abs_diff']:.2g}",
            f"- greedy continuation of {verification['greedy_tokens']} tokens: {verification['greedy']}",
        ]
    else:
        lines.append("This export was not verified (transformers was not installed or `--verify false`).")
    lines += ["", "This is a small model trained for learning; do not rely on what it writes.", ""]
    return "\n".join(lines)
