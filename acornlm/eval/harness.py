"""acornlm checkpoints inside lm-evaluation-harness: every lm-eval task, scored by our own model code.

lm-eval talks to a model through three methods (its `lm_eval.api.model.LM`):
- loglikelihood((context, continuation)) -> (log p(continuation | context), is it greedy?)
- loglikelihood_rolling((text,)) -> log p(text), for perplexity tasks (wikitext, ...)
- generate_until((context, {"until": [...], "max_gen_toks": N, ...})) -> the generated text

`AcornLM` answers them with `acornlm.eval.likelihood` (tokenized as lm-eval's HF backend does, so
the two agree to rounding) and with acornlm's decoding loop. Importing this module registers the
class as lm-eval model "acornlm":

    import lm_eval, acornlm.eval.harness
    lm_eval.simple_evaluate(model="acornlm", model_args="pretrained=runs/demo/dpo", tasks=["hellaswag"])
    lm_eval.simple_evaluate(model=AcornLM(lm=acornlm.load("runs/demo")), tasks=["arc_easy"])

lm-eval is an optional extra: pip install 'acornlm[eval]'.
"""

from __future__ import annotations

from typing import Any

import lm_eval.models  # noqa: F401  (lm-eval's own models register first: its registry loads them only when empty)
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from acornlm.data.chat import chat_text
from acornlm.errors import ConfigError
from acornlm.eval.likelihood import TokenPair, encode_pair, score_continuations
from acornlm.eval.tasks import STOP_IDS
from acornlm.infer.api import LanguageModel
from acornlm.infer.generate import generate_tokens
from acornlm.infer.sampling import SamplingParams
from acornlm.infer.streaming import StreamingDetokenizer


@register_model("acornlm")
class AcornLM(LM):
    """An acornlm checkpoint as an lm-eval model.

    Args:
        pretrained: checkpoint or run directory (what `--model_args pretrained=DIR` passes).
        lm: an already loaded LanguageModel (instead of `pretrained`).
        device, dtype: as for `acornlm.load`.
        batch_size: inputs per forward pass when scoring ("auto" means 16).
        max_length: the context used (default: the model's max_position_embeddings).
        max_gen_toks: new tokens per generation unless the task says otherwise.
    """

    def __init__(self, pretrained: str | None = None, lm: LanguageModel | None = None, device: str = "auto",
                 dtype: str | None = None, batch_size: int | str = 16, max_length: int | None = None,
                 max_gen_toks: int = 256, **unused: Any) -> None:
        super().__init__()
        if lm is None:
            if pretrained is None:
                raise ConfigError("AcornLM needs pretrained=CHECKPOINT_DIR (or lm=LanguageModel)")
            lm = LanguageModel.from_checkpoint(pretrained, device=device or "auto", dtype=dtype)
        self.lm = lm
        self.batch_size = 16 if str(batch_size).startswith("auto") else int(batch_size)
        self.max_length = int(max_length) if max_length else lm.config.max_position_embeddings
        self.max_gen_toks = int(max_gen_toks)
        self._device = lm.device

    # --- scoring ---

    def _score(self, pairs: list[TokenPair], desc: str, disable_tqdm: bool) -> list[tuple[float, bool]]:
        with tqdm(total=len(pairs), desc=desc, disable=disable_tqdm) as bar:
            scored = score_continuations(self.lm.model, pairs, batch_size=self.batch_size,
                                         window=self.max_length, progress=bar.update)
        return [(s.logprob, s.greedy) for s in scored]

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [encode_pair(self.lm.tokenizer, context, continuation) for context, continuation in
                 (request.args for request in requests)]
        results = self._score(pairs, "loglikelihood", disable_tqdm)
        for request, result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", request.args, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """lm-eval's rolling windows (disjoint, one token of context each, the last one full), summed."""
        pairs: list[TokenPair] = []
        counts = []
        for (text,) in (request.args for request in requests):
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self.lm.tokenizer.encode(text), prefix_token=self.lm.tokenizer.eot_id,
                max_seq_len=self.max_length, context_len=1)]
            pairs.extend((list(context), list(continuation)) for context, continuation in windows)
            counts.append(len(windows))
        scored = self._score(pairs, "loglikelihood_rolling", disable_tqdm)
        results, start = [], 0
        for request, count in zip(requests, counts):
            total = sum(logprob for logprob, _ in scored[start:start + count])
            start += count
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
            results.append(total)
        return results

    # --- generation ---

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        outputs = []
        for request in tqdm(requests, desc="generate_until", disable=disable_tqdm):
            context, options = request.args
            outputs.append(self._generate(context, dict(options or {})))
            self.cache_hook.add_partial("generate_until", request.args, outputs[-1])
        return outputs

    def _generate(self, context: str, options: dict[str, Any]) -> str:
        """Decode until a stop string, the end-of-text/turn token or max_gen_toks; the text before the stop."""
        until = options.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        budget = int(options.pop("max_gen_toks", self.max_gen_toks))
        sample = bool(options.pop("do_sample", False))
        temperature = float(options.pop("temperature", 0.0)) if sample else 0.0
        params = SamplingParams(max_new_tokens=budget, temperature=temperature,
                                top_p=float(options.pop("top_p", 1.0)), seed=0)
        prompt = self.lm.tokenizer.encode(context) or [self.lm.tokenizer.eot_id]
        prompt = prompt[-max(1, self.max_length - budget):]  # left-truncate, as lm-eval's HF backend does
        detokenizer = StreamingDetokenizer(self.lm.tokenizer.token_bytes, stop=until)  # cuts at a stop string
        text = ""
        for token in generate_tokens(self.lm.model, prompt, params, eos_ids=STOP_IDS,
                                     vocab_size=self.lm.tokenizer.vocab_size):
            text += detokenizer.push(token)
            if detokenizer.stopped:
                break
        return text + detokenizer.flush()

    # --- chat template (lm-eval's --apply_chat_template) ---

    @property
    def tokenizer_name(self) -> str:
        return "acornlm-" + str(self.lm.info.get("tokenizer", {}).get("fingerprint", "chatml"))[:16]

    def chat_template(self, chat_template: bool | str = False) -> str:
        return "chatml"

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return chat_text(chat_history, add_generation_prompt=add_generation_prompt)
