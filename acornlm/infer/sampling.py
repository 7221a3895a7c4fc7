"""Sampling: how the next token is picked from the model's logits.

`SamplingParams` holds one request's settings. The transforms below are pure functions on a
[batch, vocab] logits tensor, applied in the order Hugging Face uses:

    penalties (repetition, frequency, presence) -> temperature -> top-k -> top-p -> min-p -> sample

`TokenSampler` keeps the per-request state (the seeded random generator and the counts of
tokens seen so far) and turns each step's logits into the next token ids.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields

import torch

from acornlm.errors import ConfigError

# The accepted ranges, as in OpenAI's API (temperature [0, 2], penalties [-2, 2]). Outside them the
# sampler's arithmetic overflows: a frequency penalty of 1e39 or a temperature of 1e-50 turns the
# logits into inf/nan. The engine also guards each sequence on its own (see Engine), but the API
# answers a clear error first.
TEMPERATURE_RANGE = (0.0, 2.0)
GREEDY_BELOW = 1e-5  # a temperature this small is argmax in practice, and dividing by it overflows
PENALTY_RANGE = (-2.0, 2.0)  # frequency_penalty and presence_penalty
REPETITION_PENALTY_RANGE = (0.01, 100.0)
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed accepts
MAX_NUM_SAMPLES = 256
INVALID_TOKEN = -1  # what a sampler returns for a row whose logits turned into nan/inf (see draw_tokens)


@dataclass
class SamplingParams:
    """Settings of one generation request.

    Args:
        max_new_tokens: Most tokens to generate (fewer if a stop condition or the context limit comes first).
        temperature: Divides the logits, in [0, 2]; below 1 is more conservative, above 1 more random;
            0 (or below 1e-5) = greedy (argmax).
        top_k: Sample only among the k most likely tokens; 0 = no limit.
        top_p: Nucleus sampling: sample among the smallest set of tokens whose probabilities sum to >= top_p; 1 = off.
        min_p: Drop tokens whose probability is below min_p x the top token's probability; 0 = off.
        repetition_penalty: CTRL-style penalty (> 1 discourages), in [0.01, 100], on every token already in the
            prompt or output.
        frequency_penalty: OpenAI-style, in [-2, 2]: subtract frequency_penalty x (times the token was generated) from its logit.
        presence_penalty: OpenAI-style, in [-2, 2]: subtract presence_penalty from the logit of every token generated at least once.
        stop: Strings that end the generation; the text returned stops before the first one.
        stop_token_ids: Token ids that end the generation (in addition to the end-of-text token); never returned.
        seed: Seed of this request's random generator; the same seed, prompt and settings reproduce the output.
            None = a fresh random seed.
        num_samples: Independent continuations of the prompt (at most 256), decoded together as one batch.
    """

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    seed: int | None = None
    num_samples: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):  # a single stop string is a common way to call it
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.validate()

    def validate(self) -> None:
        """Reject settings that cannot work, with the reason and the allowed range."""
        def is_int(value) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        def is_number(value) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

        if not is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        def check_range(name: str, low: float, high: float, what: str) -> None:
            value = getattr(self, name)
            if not is_number(value) or not low <= value <= high:
                raise ConfigError(f"{name} must be a number in [{low:g}, {high:g}] ({what}), got {value!r}")

        check_range("temperature", *TEMPERATURE_RANGE, "0 = greedy")
        if not is_int(self.top_k) or self.top_k < 0:
            raise ConfigError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1] (1 = off), got {self.top_p!r}")
        check_range("min_p", 0.0, 1.0, "0 = off")
        check_range("repetition_penalty", *REPETITION_PENALTY_RANGE, "1 = off, > 1 discourages repeats")
        check_range("frequency_penalty", *PENALTY_RANGE, "0 = off")
        check_range("presence_penalty", *PENALTY_RANGE, "0 = off")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise ConfigError(f"stop must be a list of non-empty strings, got {self.stop!r}")
        if not all(is_int(t) and 0 <= t < 2**31 for t in self.stop_token_ids):
            raise ConfigError(f"stop_token_ids must be token ids (integers in [0, 2**31)), got {self.stop_token_ids!r}")
        if self.seed is not None and not (is_int(self.seed) and SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]):
            raise ConfigError(f"seed must be an integer in [-2**63, 2**64 - 1] or None, got {self.seed!r}")
        if not is_int(self.num_samples) or not 1 <= self.num_samples <= MAX_NUM_SAMPLES:
            raise ConfigError(f"num_samples must be an integer in [1, {MAX_NUM_SAMPLES}], got {self.num_samples!r}")

    @classmethod
    def from_kwargs(cls, **kwargs) -> SamplingParams:
        """Build from keyword arguments, naming the valid ones when a keyword is unknown."""
        valid = [f.name for f in fields(cls)]
        unknown = sorted(set(kwargs) - set(valid))
        if unknown:
            raise ConfigError(f"unknown sampling option(s) {unknown}; valid options: {valid}")
        return cls(**kwargs)

    @property
    def greedy(self) -> bool:
        """Temperature 0, or so close to 0 that sampling would be argmax anyway (and 1/T would overflow)."""
        return self.temperature < GREEDY_BELOW

    @property
    def uses_repetition_penalty(self) -> bool:
        return self.repetition_penalty != 1.0

    @property
    def uses_count_penalties(self) -> bool:
        return self.frequency_penalty != 0.0 or self.presence_penalty != 0.0


# ---------------------------------------------------------------------------------------------
# Pure transforms on [batch, vocab] logits. None modifies its input.
# ---------------------------------------------------------------------------------------------

def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL repetition penalty (Keskar et al. 2019): for every token already seen,
    logit / penalty if logit > 0 else logit * penalty, so a penalty > 1 always lowers its probability.

    `seen` is a [batch, vocab] boolean mask.
    """
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def apply_frequency_presence_penalty(logits: torch.Tensor, counts: torch.Tensor,
                                     frequency_penalty: float, presence_penalty: float) -> torch.Tensor:
    """OpenAI penalties: logit -= frequency_penalty * count + presence_penalty * (count > 0).

    `counts` is a [batch, vocab] tensor of how often each token was generated so far.
    """
    return logits - frequency_penalty * counts - presence_penalty * (counts > 0).to(logits.dtype)


def apply_temperature(logits: torch.Tensor, temperature: float | torch.Tensor) -> torch.Tensor:
    """Temperature scaling: softmax(logits / T); T < 1 sharpens the distribution, T > 1 flattens it."""
    return logits / temperature


def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k filtering (Fan et al. 2018): keep the k largest logits of each row, set the rest to -inf.

    Tokens tied with the k-th largest logit are kept too. k = 0 or k >= vocab keeps everything.
    """
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth_largest = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth_largest, float("-inf"))


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filtering (Holtzman et al. 2019): keep the smallest set of most likely tokens whose
    probabilities sum to >= p; the most likely token is always kept.

    A token (in descending order) is dropped when the probability mass *before* it already reaches p.
    """
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    sorted_probs = sorted_logits.softmax(dim=-1)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    drop_sorted = mass_before >= p
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def apply_min_p(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Min-p filtering (Nguyen et al. 2024): drop tokens with probability < min_p * max probability."""
    if min_p <= 0.0:
        return logits
    probs = logits.softmax(dim=-1)
    threshold = min_p * probs.max(dim=-1, keepdim=True).values
    return logits.masked_fill(probs < threshold, float("-inf"))


def offset_seed(seed: int | None, offset: int) -> int | None:
    """seed + offset (the seed of sample or turn `offset`), wrapped to stay in SEED_RANGE."""
    if seed is None:
        return None
    shifted = seed + offset
    return shifted - 2**64 if shifted > SEED_RANGE[1] else shifted


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator:
    """A random generator for one request, so a seed reproduces its output without touching global RNG."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()  # a fresh non-deterministic seed
    else:
        generator.manual_seed(seed)
    return generator


class TokenSampler:
    """Turns the last position's logits [batch, vocab] into next tokens [batch] for one request.

    It owns the request's random generator and the penalty state: a [batch, vocab] mask of tokens
    seen in the prompt or output (repetition penalty) and counts of generated tokens
    (frequency/presence penalties, which count only generated tokens, as in OpenAI's API and vLLM).
    The state tensors are only allocated when their penalty is switched on.
    """

    def __init__(self, params: SamplingParams, prompt_ids: Sequence[int], batch_size: int,
                 vocab_size: int, device: torch.device | str) -> None:
        self.params = params
        self.generator = None if params.greedy else make_generator(params.seed, device)
        self.seen = None
        if params.uses_repetition_penalty:
            self.seen = torch.zeros(batch_size, vocab_size, dtype=torch.bool, device=device)
            prompt = torch.tensor([t for t in prompt_ids if t < vocab_size], dtype=torch.long, device=device)
            self.seen[:, prompt] = True
        self.counts = None
        if params.uses_count_penalties:
            self.counts = torch.zeros(batch_size, vocab_size, dtype=torch.float32, device=device)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """Pick the next token of every row and record it in the penalty state."""
        p = self.params
        logits = logits.float()
        if self.seen is not None:
            logits = apply_repetition_penalty(logits, self.seen, p.repetition_penalty)
        if self.counts is not None:
            logits = apply_frequency_presence_penalty(logits, self.counts, p.frequency_penalty, p.presence_penalty)
        if p.greedy:
            tokens = greedy_tokens(logits)
        else:
            logits = apply_temperature(logits, p.temperature)
            logits = apply_top_k(logits, p.top_k)
            logits = apply_top_p(logits, p.top_p)
            logits = apply_min_p(logits, p.min_p)
            uniforms = torch.rand(logits.shape[0], dtype=torch.float64, generator=self.generator,
                                  device=logits.device)
            tokens = draw_tokens(logits.softmax(dim=-1), uniforms)
        self.observe(tokens)
        return tokens

    @property
    def plain(self) -> bool:
        """Greedy or temperature-only: no penalty state and no top-k/top-p/min-p filter (see `sample_rows`)."""
        p = self.params
        return (self.seen is None and self.counts is None
                and (p.greedy or (p.top_k <= 0 and p.top_p >= 1.0 and p.min_p <= 0.0)))

    def observe(self, tokens: torch.Tensor) -> None:
        """Add the tokens just generated [batch] to the penalty state (an INVALID_TOKEN row adds nothing)."""
        valid = (tokens != INVALID_TOKEN)[:, None]
        index = tokens.clamp(min=0)[:, None]
        if self.seen is not None:
            self.seen.scatter_(1, index, valid | self.seen.gather(1, index))
        if self.counts is not None:
            self.counts.scatter_add_(1, index, valid.to(self.counts.dtype))


def draw_tokens(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One token per row of probs [rows, vocab] by inverse transform sampling: the first token whose
    cumulative probability exceeds u x the row's total, for the row's u ~ U[0, 1) in `uniforms` [rows].

    Why not torch.multinomial: on the CPU it draws one exponential number per vocabulary entry
    (~110 us for 6,400 tokens), where this needs one uniform number per row and a running sum. The
    sum is in float64, so even 100,000 terms stay within ~1e-11 of exact. A token of probability 0 is
    never drawn: its cumulative value equals its predecessor's, so no u falls on it.

    A row whose probabilities hold a nan or inf, or no positive entry, gets INVALID_TOKEN: the
    caller ends that sequence alone, and the other rows of the batch go on.
    """
    cdf = probs.double().cumsum(dim=-1)
    total = cdf[:, -1:]
    tokens = torch.searchsorted(cdf, uniforms[:, None] * total, right=True).squeeze(-1)
    valid = (total[:, 0] > 0) & (total[:, 0] < math.inf)  # false for nan too
    return tokens.masked_fill(~valid, INVALID_TOKEN)


def numerical_failure(params: SamplingParams) -> str:
    """The message of a sequence whose logits turned into nan/inf (its sampler gave INVALID_TOKEN)."""
    return (f"sampling failed: the logits turned into nan/inf (temperature={params.temperature:g}, "
            f"repetition_penalty={params.repetition_penalty:g}, frequency_penalty={params.frequency_penalty:g}, "
            f"presence_penalty={params.presence_penalty:g}); use settings within the documented ranges")


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """argmax of each row of logits [rows, vocab]; INVALID_TOKEN for a row whose largest logit is
    nan (amax propagates it), +inf or -inf (every token masked): no token can be chosen there."""
    return logits.argmax(dim=-1).masked_fill(~torch.isfinite(logits.amax(dim=-1)), INVALID_TOKEN)


def sample_rows(logits: torch.Tensor, samplers: Sequence[TokenSampler]) -> torch.Tensor:
    """The next token of each row of logits [rows, vocab], row i picked as samplers[i] would pick it.

    Why: in the engine's batched decode step each row is its own request, with its own settings and
    random generator, and calling each sampler on its row costs ~8 small operations per row. Rows
    whose sampler is `plain` (the usual request) are done together instead: one temperature division,
    one softmax and one `draw_tokens` for all of them, with each row's uniform number drawn from its
    own generator, so every row gets the token its sampler alone would give (tests/test_engine.py
    checks batched against unbatched generation). Other rows go through their sampler one by one.
    """
    if len(samplers) == 1:
        return samplers[0](logits)  # nothing to share
    tokens = torch.empty(len(samplers), dtype=torch.long, device=logits.device)
    greedy, sampled = [], []
    for row, sampler in enumerate(samplers):
        if not sampler.plain:
            tokens[row] = sampler(logits[row:row + 1])[0]
        else:
            (greedy if sampler.params.greedy else sampled).append(row)
    if greedy:
        tokens[greedy] = greedy_tokens(logits[greedy].float())
    if sampled:
        temperatures = torch.tensor([samplers[row].params.temperature for row in sampled],
                                    dtype=torch.float32, device=logits.device)
        probs = apply_temperature(logits[sampled].float(), temperatures[:, None]).softmax(dim=-1)
        uniforms = torch.cat([torch.rand(1, dtype=torch.float64, generator=samplers[row].generator,
                                         device=logits.device) for row in sampled])
        tokens[sampled] = draw_tokens(probs, uniforms)
    return tokens
