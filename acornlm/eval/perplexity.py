"""Perplexity and bits per byte of a model on any text: compare two models, or one model before
and after fine-tuning, on your own corpus.

    cross entropy  H = -(1/N) sum_i log p(t_i | t_<i)      (nats per token, N tokens)
    perplexity     PPL = exp(H)
    bits per byte  BPB = -sum_i log2 p(t_i | t_<i) / (UTF-8 bytes of the text)

Perplexity depends on the tokenizer (a model with bigger tokens predicts fewer, harder ones);
bits per byte does not, so it is the figure to compare across tokenizers. Each document is
scored on its own, starting from the end-of-text token, with sliding windows
(`acornlm.eval.likelihood.rolling_windows`) when it is longer than the model's context.

    result = perplexity(lm, ["first document", "second document"], stride=256)
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from typing import Any

from tqdm import tqdm

from acornlm.errors import ConfigError
from acornlm.eval.likelihood import TokenPair, rolling_windows, score_continuations
from acornlm.infer.api import LanguageModel

PAIRS_PER_ROUND = 256  # windows scored together: enough to fill batches, few enough to bound memory


def perplexity(lm: LanguageModel, documents: Iterable[str], window: int | None = None, stride: int | None = None,
               batch_size: int = 8, progress: bool = True) -> dict[str, Any]:
    """Cross entropy, perplexity and bits per byte of `documents` under the model.

    `window` (default: the model's context) is the most tokens one forward pass sees; each
    window scores `stride` new tokens (default: half the window) with the rest as context.
    """
    context = lm.config.max_position_embeddings
    window = window or context
    if not 2 <= window <= context:
        raise ConfigError(f"--window must be between 2 and the model's context ({context}), got {window}")
    stride = stride or max(1, window // 2)
    if not 1 <= stride <= window:
        raise ConfigError(f"--stride must be between 1 and --window ({window}), got {stride}")
    nll = 0.0
    tokens = documents_seen = total_bytes = 0
    pending: list[TokenPair] = []
    started = time.perf_counter()
    bar = tqdm(unit="tok", desc="perplexity", disable=not progress, leave=False)

    def flush() -> None:
        nonlocal nll
        for scored in score_continuations(lm.model, pending, batch_size=batch_size, window=window):
            nll -= scored.logprob
            bar.update(scored.tokens)
        pending.clear()

    for text in documents:
        ids = lm.tokenizer.encode(text)
        if not ids:
            continue
        documents_seen += 1
        tokens += len(ids)
        total_bytes += len(text.encode("utf-8"))
        pending.extend(rolling_windows(ids, lm.tokenizer.eot_id, window, stride))
        if len(pending) >= PAIRS_PER_ROUND:
            flush()
    flush()
    bar.close()
    if tokens == 0:
        raise ConfigError("the input holds no text to score")
    seconds = time.perf_counter() - started
    return {
        "documents": documents_seen,
        "tokens": tokens,
        "bytes": total_bytes,
        "cross_entropy": nll / tokens,
        "perplexity": math.exp(min(nll / tokens, 700.0)),
        "bits_per_token": nll / tokens / math.log(2),
        "bits_per_byte": nll / math.log(2) / total_bytes,
        "window": window,
        "stride": stride,
        "seconds": round(seconds, 3),
        "tokens_per_second": round(tokens / seconds, 1) if seconds > 0 else None,
    }
