"""`acornlm viz attention` and `acornlm viz sampling`: the teaching plots, drawn from a checkpoint."""

from __future__ import annotations

from pathlib import Path

from acornlm.cli.generate import read_prompt
from acornlm.cli.terminal import visible
from acornlm.errors import ConfigError
from acornlm.infer.sampling import SamplingParams


def attention(
    ckpt: str | None = None,
    text: str | None = None,
    out: str = "attention.png",
    layers: list[int] | None = None,
    heads: list[int] | None = None,
    save_weights: bool = False,
    device: str = "auto",
    dtype: str = "auto",
) -> None:
    """Plot the attention weights of every layer and head on a text, as a grid of heatmaps.

    Each panel is softmax(Q K^T / sqrt(d_head)) with the causal mask for one layer and head: row i
    shows how much token i takes from each earlier token (each row sums to 1; the grey triangle is
    the future, which the mask hides). Tokens are labelled with their own text: a token holding only
    part of a UTF-8 character shows its bytes, like <e4>. The weights come from the reference formula
    (eager attention), whichever attention kernel the model normally runs.

    Args:
        ckpt: Checkpoint directory, or a run directory (its latest checkpoint is used).
        text: The text to run through the model; longer than the context, it is cut from the left.
        out: The image to write (.png, .svg or .pdf).
        layers: Layer indices to plot (several allowed: --layers 0 1); default: all.
        heads: Head indices to plot (several allowed); default: all.
        save_weights: Also write the raw weights as JSON next to the image (same name, .json).
        device: "auto" (cuda if available, else cpu), "cpu", "cuda", "cuda:N" or "mps".
        dtype: "auto" (as stored in the checkpoint), "float32", "bfloat16" or "float16".
    """
    from acornlm.eval.viz import (
        capture_attention,
        check_indices,
        fit_to_context,
        missing_font_note,
        plot_attention,
        token_label,
        write_attention_json,
    )
    from acornlm.infer.api import LanguageModel

    if ckpt is None:
        raise ConfigError("--ckpt is required: a checkpoint directory or a run directory")
    if text is None or text == "":
        raise ConfigError("--text is required and must not be empty: the text whose attention to plot")
    check_image_path(out)
    lm = LanguageModel.from_checkpoint(ckpt, device=device, dtype=dtype)
    config = lm.config
    layers = check_indices(layers, config.num_hidden_layers, "layer")
    heads = check_indices(heads, config.num_attention_heads, "head")
    ids, dropped = fit_to_context(lm.tokenizer.encode(text), config.max_position_embeddings)
    if dropped:
        print(f"note: the text is {len(ids) + dropped} tokens, longer than the model's context of "
              f"{config.max_position_embeddings}; plotting its last {len(ids)} tokens")
    labels = [token_label(lm.tokenizer, token_id) for token_id in ids]
    weights = capture_attention(lm.model, ids, layers)
    plot_attention(weights, labels, out, heads=heads)
    print(f"wrote {out}: {len(layers)} layer(s) x {len(heads)} head(s) over {len(ids)} tokens")
    print("tokens: " + visible("|".join(labels)))
    if save_weights:
        json_path = Path(out).with_suffix(".json")
        write_attention_json(json_path, weights, ids, labels, heads)
        print(f"wrote {json_path}: weights[layer][head][query][key]")
    note = missing_font_note(labels)
    if note:
        print(f"note: {note}")


def sampling(
    ckpt: str | None = None,
    prompt: str | list[str] | None = None,
    temperature: float = 0.8,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    top_n: int = 20,
    out: str = "sampling.png",
    device: str = "auto",
    dtype: str = "auto",
) -> None:
    """Plot the next-token distribution after a prompt and what temperature, top-k, top-p and min-p keep.

    One panel per step, in the order generation applies them (temperature -> top-k -> top-p -> min-p),
    over the most likely tokens: dashed bars are the distribution entering the step, filled bars
    the one leaving it, renormalised over the tokens kept. The same numbers are printed as a table.
    The steps are the functions `acornlm generate` samples with, so the kept set is exactly the set
    it draws from.

    Args:
        ckpt: Checkpoint directory, or a run directory (its latest checkpoint is used).
        prompt: The text before the next token ('' = the start of a document, as in `acornlm generate`).
        temperature: Divides the logits, in [0, 2]; 0 (or below 1e-5) = greedy.
        top_k: Keep the k most likely tokens; 0 = off.
        top_p: Keep the smallest set of most likely tokens whose probabilities sum to >= top_p; 1 = off.
        min_p: Drop tokens less likely than min_p x the most likely token; 0 = off.
        top_n: How many of the most likely tokens to show.
        out: The image to write (.png, .svg or .pdf).
        device: "auto" (cuda if available, else cpu), "cpu", "cuda", "cuda:N" or "mps".
        dtype: "auto" (as stored in the checkpoint), "float32", "bfloat16" or "float16".
    """
    from acornlm.eval.viz import (
        fit_to_context,
        missing_font_note,
        next_token_logits,
        plot_sampling,
        sampling_table,
        sampling_view,
        token_label,
    )
    from acornlm.infer.api import LanguageModel

    if ckpt is None:
        raise ConfigError("--ckpt is required: a checkpoint directory or a run directory")
    text = read_prompt(prompt, None)
    SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)  # fail before loading
    if isinstance(top_n, bool) or not isinstance(top_n, int) or not 1 <= top_n <= 200:
        raise ConfigError(f"top_n must be an integer in [1, 200], got {top_n!r}")
    check_image_path(out)
    lm = LanguageModel.from_checkpoint(ckpt, device=device, dtype=dtype)
    context = lm.config.max_position_embeddings
    ids, dropped = fit_to_context(lm.prompt_ids(text), context)
    if dropped:
        print(f"note: the prompt is {len(ids) + dropped} tokens, longer than the model's context of {context}; "
              f"keeping its last {len(ids)} tokens (as generation does)")
    logits = next_token_logits(lm.model, ids, lm.tokenizer.vocab_size)
    view = sampling_view(logits, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    print(visible(sampling_table(view, lm.tokenizer, top_n)))
    plot_sampling(view, lm.tokenizer, out, top_n=top_n)
    print(f"wrote {out}")
    note = missing_font_note([token_label(lm.tokenizer, i) for i in view.order[:top_n].tolist()])
    if note:
        print(f"note: {note}")


def check_image_path(out: str) -> None:
    """ConfigError for an output name matplotlib cannot write, before the model is loaded."""
    if not out or Path(out).suffix.lower() not in (".png", ".svg", ".pdf"):
        raise ConfigError(f"--out must name a .png, .svg or .pdf file, got {out!r}")
    if Path(out).is_dir():
        raise ConfigError(f"--out {out} is a directory; give a file name such as {Path(out) / 'plot.png'}")
