"""Teaching plots on a real model: what attention looks at, and what sampling keeps.

    weights = capture_attention(model, ids)               # {layer: [heads, T, T]}, rows sum to 1
    plot_attention(weights, labels, "attention.png")
    view = sampling_view(logits, temperature=0.8, top_k=50, top_p=0.9, min_p=0.05)
    plot_sampling(view, tokenizer, "sampling.png"); print(sampling_table(view, tokenizer))

Attention weights are the softmax(Q K^T / sqrt(d_head) + M) of `acornlm.model.transformer.eager_attention`,
M the causal mask (-inf above the diagonal). They are captured without touching the model's code:
`capturing_attention` registers, for each layer, an attention function (`register_attention`) that
returns eager_attention's own output and records the softmax next to it, and restores the layers'
implementations afterwards. tests/test_viz.py checks that the logits equal the reference's.

The sampling view calls the very transforms generation calls (acornlm.infer.sampling, in
`TokenSampler`'s order: temperature -> top-k -> top-p -> min-p), so the kept set it draws is the set
generation samples from. Plots use matplotlib's file-only Agg canvas (no pyplot, no global backend).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib import font_manager, rc_context
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from acornlm.errors import ConfigError
from acornlm.files import atomic_path, atomic_write_json
from acornlm.infer.sampling import (
    SamplingParams,
    apply_min_p,
    apply_temperature,
    apply_top_k,
    apply_top_p,
)
from acornlm.model.transformer import ATTENTION_FUNCTIONS, Transformer, eager_attention, register_attention
from acornlm.tokenizer import Tokenizer
from acornlm.tokenizer.compare import token_text

# Fonts tried after DejaVu Sans (matplotlib's default, Latin/Greek/Cyrillic) for glyphs it lacks, in
# order: CJK first, then monochrome emoji. Colour emoji fonts (bitmap) are left out: Agg cannot draw them.
FALLBACK_FONTS = (
    "Noto Sans CJK SC", "Noto Sans CJK JP", "Noto Sans SC", "Noto Serif CJK SC", "Source Han Sans SC",
    "Source Han Sans CN", "WenQuanYi Zen Hei", "WenQuanYi Micro Hei", "Droid Sans Fallback", "AR PL UMing CN",
    "AR PL UKai CN", "Microsoft YaHei", "SimHei", "PingFang SC", "Hiragino Sans GB", "Heiti SC",
    "Arial Unicode MS", "Noto Emoji", "Symbola", "Segoe UI Emoji", "Segoe UI Symbol",
)
CAPTURE_NAME = "capture-layer{}"  # the attention implementation registered for layer i while capturing
MAX_PANELS = 144  # layers x heads in one figure (12 x 12, GPT-2 small); past that the panels are unreadable
LABELLED_TOKENS = 48  # up to this many tokens every one is named on the axes; beyond, every k-th
SAMPLING_STAGES = ("model", "temperature", "top-k", "top-p", "min-p")


# ---------------------------------------------------------------------------------------------
# Attention weights
# ---------------------------------------------------------------------------------------------

def attention_probs(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, is_causal: bool) -> torch.Tensor:
    """The attention weights P = softmax(Q K^T / sqrt(d) + M) [B, heads, T, S], computed step by step
    as `eager_attention` computes them (GQA keys repeated per query head, the causal mask as
    -inf, the softmax in float32): row t is how much query t takes from each key, and sums to 1."""
    _, heads, seq, head_dim = q.shape
    keys = k.shape[2]
    k = k.repeat_interleave(heads // k.shape[1], dim=1)  # [B, heads, S, D]
    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(head_dim)  # [B, heads, T, S]
    if is_causal:
        mask = torch.ones(seq, keys, dtype=torch.bool, device=q.device).tril(diagonal=keys - seq)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.float().softmax(dim=-1).to(q.dtype)


def recording_attention(layer: int, store: dict[int, torch.Tensor]) -> Callable[..., torch.Tensor]:
    """An attention function with eager_attention's signature that returns eager_attention's output
    unchanged and stores this layer's weights (`attention_probs`, float32 on the CPU) in `store`."""
    def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                  is_causal: bool, dropout: float) -> torch.Tensor:
        store[layer] = attention_probs(q, k, mask, is_causal).float().cpu()
        return eager_attention(q, k, v, mask, is_causal, dropout)

    return attention


@contextmanager
def capturing_attention(model: Transformer, layers: Sequence[int] | None = None) -> Iterator[dict[int, torch.Tensor]]:
    """While the block runs, every forward pass records the attention weights of `layers` (default:
    all) into the yielded dict, {layer: [B, heads, T, S]}; the other layers keep their attention.

    Each layer gets its own registered function (no shared counter to go wrong); on exit the layers
    get their previous implementation back and the functions leave ATTENTION_FUNCTIONS.
    """
    layers = check_indices(layers, model.config.num_hidden_layers, "layer")
    store: dict[int, torch.Tensor] = {}
    modules = [model.model.layers[i].self_attn for i in layers]
    previous = [module.attn_implementation for module in modules]
    try:
        for index, module in zip(layers, modules):
            name = CAPTURE_NAME.format(index)
            register_attention(name, recording_attention(index, store))
            module.attn_implementation = name
        yield store
    finally:
        for index, module, name in zip(layers, modules, previous):
            module.attn_implementation = name
            ATTENTION_FUNCTIONS.pop(CAPTURE_NAME.format(index), None)


@torch.inference_mode()
def capture_attention(model: Transformer, input_ids: Sequence[int],
                      layers: Sequence[int] | None = None) -> dict[int, torch.Tensor]:
    """The attention weights of one sequence: {layer: [heads, T, T]} for `layers` (default: all).

    Row t of head h is softmax(q_t K^T / sqrt(d_head)) over the keys 0..t (the causal mask zeroes
    the rest): what token t mixes into its output. Query heads sharing a KV head (GQA) each get
    their own rows.
    """
    ids = torch.tensor([list(input_ids)], dtype=torch.long, device=model.device)
    if ids.shape[1] == 0:
        raise ConfigError("the text is empty: give at least one token to look at")
    with capturing_attention(model, layers) as store:
        model(ids, logits_at=torch.tensor([ids.shape[1] - 1], device=model.device))
    return {layer: weights[0] for layer, weights in sorted(store.items())}


def check_indices(indices: Sequence[int] | None, count: int, what: str) -> list[int]:
    """`indices` (None = all of range(count)) checked against range(count): ConfigError naming the valid range."""
    if indices is None:
        return list(range(count))
    indices = [indices] if isinstance(indices, int) else list(indices)
    if not indices:
        raise ConfigError(f"no {what} selected; valid {what}s are 0..{count - 1}")
    bad = [i for i in indices if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < count]
    if bad:
        raise ConfigError(f"{what} index {bad[0]!r} is out of range: this model has {count} {what}s, 0..{count - 1}")
    return list(dict.fromkeys(indices))  # in the order given, without repeats


def fit_to_context(ids: Sequence[int], context_length: int) -> tuple[list[int], int]:
    """(the last `context_length` ids, how many were dropped from the left): positions past the
    context have no embedding (learned) or were never trained (RoPE)."""
    ids = list(ids)
    dropped = max(0, len(ids) - context_length)
    return ids[dropped:], dropped


# ---------------------------------------------------------------------------------------------
# Sampling: what temperature, top-k, top-p and min-p keep
# ---------------------------------------------------------------------------------------------

@dataclass
class SamplingStage:
    """One step of the sampling pipeline.

    Attributes:
        name: "model", "temperature", "top-k", "top-p" or "min-p".
        setting: The setting in words ("T = 0.8", "k = 50", "off").
        probs: softmax of the logits after this step [vocab]: renormalised over the tokens still kept.
        kept: The tokens still allowed after this step [vocab] (finite logits).
    """

    name: str
    setting: str
    probs: torch.Tensor
    kept: torch.Tensor


@dataclass
class SamplingView:
    """The next-token distribution and what each sampling step keeps of it.

    Attributes:
        params: The validated settings.
        order: Token ids by probability, most likely first [vocab] (temperature does not change it).
        stages: SAMPLING_STAGES in order; the last one's probs are what a token is drawn from.
    """

    params: SamplingParams
    order: torch.Tensor
    stages: list[SamplingStage]

    @property
    def kept(self) -> torch.Tensor:
        """The tokens generation can draw [vocab] (bool)."""
        return self.stages[-1].kept

    @property
    def final(self) -> torch.Tensor:
        """The probabilities generation draws from [vocab]."""
        return self.stages[-1].probs


def sampling_view(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                  min_p: float = 0.0) -> SamplingView:
    """Apply temperature, top-k, top-p and min-p to one row of logits [vocab] with the functions
    `TokenSampler` uses, in its order, keeping every intermediate distribution.

    temperature: p_i = softmax(z / T)_i; top-k keeps the k largest logits; top-p the smallest set of
    most likely tokens whose probabilities sum to >= p; min-p the tokens with p_i >= min_p * max_j p_j.
    A temperature below 1e-5 is greedy, as in generation: only the argmax is kept, the filters are skipped.
    Settings are checked by `SamplingParams.validate` (ConfigError with the allowed range).
    """
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    z = logits.detach().float().reshape(1, -1)  # [1, vocab]: the transforms work on rows
    order = torch.argsort(z[0], descending=True, stable=True)
    stages = [stage("model", "softmax(z)", z)]
    if params.greedy:
        argmax = torch.full_like(z, float("-inf"))
        argmax[0, order[0]] = 0.0
        stages.append(stage("temperature", f"T = {temperature:g}: greedy, the argmax only", argmax))
        for name in SAMPLING_STAGES[2:]:
            stages.append(stage(name, "skipped (greedy)", argmax))
        return SamplingView(params, order, stages)
    z = apply_temperature(z, params.temperature)
    stages.append(stage("temperature", f"T = {params.temperature:g}", z))
    z = apply_top_k(z, params.top_k)
    stages.append(stage("top-k", f"k = {params.top_k}" if params.top_k > 0 else "off", z))
    z = apply_top_p(z, params.top_p)
    stages.append(stage("top-p", f"p = {params.top_p:g}" if params.top_p < 1 else "off", z))
    z = apply_min_p(z, params.min_p)
    stages.append(stage("min-p", f"min_p = {params.min_p:g}" if params.min_p > 0 else "off", z))
    return SamplingView(params, order, stages)


def stage(name: str, setting: str, logits: torch.Tensor) -> SamplingStage:
    return SamplingStage(name, setting, logits.softmax(dim=-1)[0], torch.isfinite(logits[0]))


@torch.inference_mode()
def next_token_logits(model: Transformer, prompt_ids: Sequence[int], vocab_size: int | None = None) -> torch.Tensor:
    """The logits [vocab] of the token after `prompt_ids`, as generation's prefill computes them (the
    last position only, cut to the tokenizer's `vocab_size` when the model pads its vocabulary)."""
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=model.device)
    if ids.shape[1] == 0:
        raise ConfigError("the prompt is empty: give at least one token (for example the end-of-text id)")
    logits = model(ids, logits_at=torch.tensor([ids.shape[1] - 1], device=model.device))
    return logits[0, 0, :vocab_size or model.config.vocab_size].float().cpu()


def sampling_table(view: SamplingView, tokenizer: Tokenizer, top_n: int = 20) -> str:
    """The `top_n` most likely tokens with p after each step ('-' where a step dropped it), and a
    line on how many tokens are kept in all."""
    names = [s.name if s.name != "model" else "p" for s in view.stages]
    rows = [["#", "id", "token", *names]]
    for rank, token_id in enumerate(view.order[:top_n].tolist(), start=1):
        cells = [f"{s.probs[token_id].item():.4f}" if s.kept[token_id] else "-" for s in view.stages]
        rows.append([str(rank), str(token_id), token_label(tokenizer, token_id), *cells])
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(cell.rjust(width) if c != 2 else cell.ljust(width)
                       for c, (cell, width) in enumerate(zip(row, widths))).rstrip() for row in rows]
    kept = int(view.kept.sum())
    settings = ", ".join(f"{s.name}: {s.setting}" for s in view.stages[1:])
    lines.append(f"kept {kept} of {view.kept.numel()} tokens ({settings}); a token is drawn from the last column")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Plotting
# ---------------------------------------------------------------------------------------------

def token_label(tokenizer: Tokenizer, token_id: int) -> str:
    """A token as an axis label: its text (`<e4>` for bytes of a partial character) with whitespace
    made visible (space as ␣, newline as ↵) and other control characters as \\xNN."""
    text = token_text(tokenizer, token_id)
    text = text.replace(" ", "␣").replace("\n", "↵").replace("\t", "\\t").replace("\r", "\\r")
    return "".join(ch if ch.isprintable() else f"\\x{ord(ch):02x}" for ch in text) or "∅"


def font_families() -> list[str]:
    """DejaVu Sans, then the installed fallback fonts (CJK, emoji) for the glyphs it lacks."""
    installed = {font.name for font in font_manager.fontManager.ttflist}
    return ["DejaVu Sans", *[name for name in FALLBACK_FONTS if name in installed]]


def needs_fallback_font(labels: Sequence[str]) -> bool:
    """Whether a label has a character DejaVu Sans cannot draw (Chinese, Japanese, emoji, ...)."""
    font = font_manager.get_font(font_manager.findfont("DejaVu Sans"))
    return any(font.get_char_index(ord(ch)) == 0 for label in labels for ch in label)


def missing_font_note(labels: Sequence[str]) -> str | None:
    """A hint when some labels need a font that is not installed (they would be drawn as boxes)."""
    if needs_fallback_font(labels) and len(font_families()) == 1:
        return ("no CJK/emoji font is installed, so some token labels are drawn as boxes; install one "
                "(e.g. `apt install fonts-noto-cjk`) to see them")
    return None


@contextmanager
def plot_style() -> Iterator[None]:
    """Fallback fonts on, and matplotlib's 'Glyph missing' warnings off (a label it cannot draw
    becomes a box; `missing_font_note` says why)."""
    with rc_context({"font.family": font_families(), "axes.unicode_minus": False}), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Glyph .* missing from")
        warnings.filterwarnings("ignore", message=r"findfont: Font family")
        yield


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write the figure atomically, in the format its suffix names (png, svg, pdf)."""
    path = Path(path)
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in FigureCanvasAgg(fig).get_supported_filetypes():
        raise ConfigError(f"cannot write a figure to {path}: use a .png, .svg or .pdf file name")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=fmt)
    return path


def set_token_ticks(axis, labels: Sequence[str], size: float) -> None:
    """Every token named up to LABELLED_TOKENS tokens, every k-th beyond (with its position)."""
    step = 1 if len(labels) <= LABELLED_TOKENS else math.ceil(len(labels) / LABELLED_TOKENS)
    positions = list(range(0, len(labels), step))
    shown = [labels[i] if step == 1 else f"{i}:{labels[i]}" for i in positions]
    axis.set_ticks(positions, shown, fontsize=size)


def plot_attention(weights: dict[int, torch.Tensor], labels: Sequence[str], path: str | Path,
                   heads: Sequence[int] | None = None, title: str | None = None) -> Path:
    """One heatmap per layer (rows) and head (columns) of `weights` ({layer: [heads, T, T]}): row =
    query token, column = key token, colour = weight. The cells above the diagonal (the future,
    masked to -inf before the softmax) are grey."""
    layers = sorted(weights)
    if not layers:
        raise ConfigError("no attention weights to plot")
    num_heads, seq, _ = weights[layers[0]].shape
    heads = check_indices(heads, num_heads, "head")
    if len(layers) * len(heads) > MAX_PANELS:
        raise ConfigError(f"{len(layers)} layers x {len(heads)} heads = {len(layers) * len(heads)} panels, more "
                          f"than {MAX_PANELS}; pick some with --layers and --heads")
    if len(labels) != seq:
        raise ConfigError(f"{len(labels)} token labels for {seq} tokens")
    panel = min(4.0, max(2.2, 0.16 * seq))
    size = max(4.0, min(9.0, 260 / max(seq, 1) / max(1, len(heads)) ** 0.5))
    future = np.triu(np.ones((seq, seq), dtype=bool), k=1)
    with plot_style():
        fig = Figure(figsize=(panel * len(heads) + 1.6, panel * len(layers) + 1.2), dpi=100, layout="constrained")
        FigureCanvasAgg(fig)
        axes = fig.subplots(len(layers), len(heads), squeeze=False)
        image = None
        for row, layer in enumerate(layers):
            for col, head in enumerate(heads):
                ax = axes[row][col]
                cells = np.ma.masked_array(weights[layer][head].numpy(), mask=future)
                image = ax.imshow(cells, vmin=0.0, vmax=1.0, cmap="viridis", interpolation="nearest")
                ax.set_facecolor("#d9d9d9")  # the masked future
                ax.set_title(f"layer {layer}, head {head}", fontsize=9)
                set_token_ticks(ax.yaxis, labels if col == 0 else [""] * seq, size)
                set_token_ticks(ax.xaxis, labels if row == len(layers) - 1 else [""] * seq, size)
                ax.tick_params(axis="x", labelrotation=90)
                if col == 0:
                    ax.set_ylabel("query (this token...)", fontsize=8)
                if row == len(layers) - 1:
                    ax.set_xlabel("key (...looks at this one)", fontsize=8)
        fig.colorbar(image, ax=axes, shrink=0.8, label="attention weight")
        fig.suptitle(title or "attention weights softmax(QK^T / sqrt(d_head)), causal mask: each row sums to 1",
                     fontsize=11)
        return save_figure(fig, path)


def plot_sampling(view: SamplingView, tokenizer: Tokenizer, path: str | Path, top_n: int = 20,
                  title: str | None = None) -> Path:
    """One bar panel per sampling step over the `top_n` most likely tokens: the outline is the
    distribution entering the step, the filled bar what leaves it (renormalised over the tokens
    kept; grey x = dropped here or earlier). The last panel is what a token is drawn from."""
    ids = view.order[:top_n].tolist()
    labels = [token_label(tokenizer, i) for i in ids]
    x = np.arange(len(ids))
    colors = ("#7f7f7f", "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728")
    with plot_style():
        fig = Figure(figsize=(max(7.0, 0.42 * len(ids) + 2.5), 2.0 * len(view.stages) + 1.4), dpi=100)
        FigureCanvasAgg(fig)
        axes = fig.subplots(len(view.stages), 1, sharex=True, squeeze=False)[:, 0]
        for index, (ax, step) in enumerate(zip(axes, view.stages)):
            probs = step.probs[ids].numpy()
            kept = step.kept[ids].numpy()
            ax.bar(x, np.where(kept, probs, 0.0), width=0.8, color=colors[index % len(colors)])
            if index > 0:  # what came in, drawn over the bars
                before = view.stages[index - 1].probs[ids].numpy()
                ax.bar(x, before, width=0.8, fill=False, edgecolor="#333333", linewidth=0.9, linestyle="--",
                       zorder=3)
            ax.scatter(x[~kept], np.zeros(int((~kept).sum())), marker="x", color="#999999", zorder=3)
            setting = step.setting
            if step.name == "min-p" and step.setting != "off" and not view.params.greedy:
                threshold = view.params.min_p * float(view.stages[index - 1].probs.max())
                ax.axhline(threshold, color="#d62728", linewidth=0.8, linestyle=":")
                setting += f" (dotted: min_p x max p = {threshold:.4f})"
            total = int(step.kept.sum())
            outside = float(step.probs[view.order[top_n:]].sum()) if view.order.numel() > top_n else 0.0
            ax.set_title(f"{step.name}: {setting}; {total} token{'s' if total != 1 else ''} kept"
                         + (f", p outside the top {len(ids)}: {outside:.3f}" if outside >= 5e-4 else ""),
                         fontsize=9, loc="left")
            ax.set_ylabel("p", fontsize=8)
            ax.set_ylim(0, max(1e-6, float(np.max(probs)), float(np.max(before)) if index else 0.0) * 1.12)
            ax.grid(axis="y", alpha=0.3)
        axes[-1].set_xticks(x, labels, rotation=90, fontsize=8)
        fig.suptitle(title or "next-token distribution: temperature -> top-k -> top-p -> min-p\n"
                     "dashed: before the step; filled: after it, renormalised; x: dropped", fontsize=10)
        fig.tight_layout()
        return save_figure(fig, path)


def write_attention_json(path: str | Path, weights: dict[int, torch.Tensor], token_ids: Sequence[int],
                         labels: Sequence[str], heads: Sequence[int] | None = None) -> Path:
    """The captured weights as JSON: {"token_ids", "tokens", "layers", "heads", "weights":
    [layer][head][query][key]} (6 decimals), for your own plots or checks."""
    layers = sorted(weights)
    heads = check_indices(heads, weights[layers[0]].shape[0], "head") if layers else []
    data: dict[str, Any] = {
        "token_ids": list(token_ids), "tokens": list(labels), "layers": layers, "heads": heads,
        "formula": "softmax(Q K^T / sqrt(d_head) + causal mask), rows = queries, columns = keys",
        "weights": [[np.round(weights[layer][head].numpy().astype(np.float64), 6).tolist() for head in heads]
                    for layer in layers],
    }
    atomic_write_json(Path(path), data)
    return Path(path)
