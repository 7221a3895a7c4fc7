"""The inference engine: many requests decoded together, joining and leaving between steps.

One background thread owns the model. Each loop iteration (a *step*):

    1. drops the sequences whose client went away (cancelled),
    2. admits waiting sequences while there is a free slot: prefill the prompt into that slot of
       the KV cache and sample the first token,
    3. runs ONE forward pass over the last token of every running sequence (the batched decode)
       and samples each row with that sequence's own settings and seeded generator.

This is *continuous batching* (Orca, Yu et al. 2022; vLLM): a request does not wait for the
current batch to finish, and a finished one frees its slot at once, so throughput grows with
the number of concurrent users instead of serving them one after another.

The KV cache is one preallocated buffer of `max_batch` slots (`SlotKVCache`); running sequences
sit in slots 0..n-1 so a decode step reads one contiguous block. Sequences have different
lengths, so the decode step passes per-row positions and an attention mask to the model.
When a sequence leaves, the last one moves into its slot (one copy of that sequence's cache).

Every sequence's tokens go through its own `StreamingDetokenizer`, so a stop string ends the
sequence (and frees the slot) as soon as it appears, and the emitted text never holds half a
character or part of a stop string. Results are delivered as `Event`s to a callback the caller
gives (the HTTP server turns them into SSE chunks).
"""

from __future__ import annotations

import collections
import itertools
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace

import torch

from acornlm.accel import accelerate
from acornlm.errors import AcornError, ConfigError
from acornlm.infer.generate import new_token_budget
from acornlm.infer.sampling import (
    INVALID_TOKEN,
    SamplingParams,
    TokenSampler,
    numerical_failure,
    offset_seed,
    sample_rows,
)
from acornlm.infer.streaming import StreamingDetokenizer
from acornlm.model import Transformer
from acornlm.tokenizer import SPECIAL_TOKENS, Tokenizer


class EngineFull(AcornError):
    """Every slot is busy and the waiting queue is full: try again later (HTTP 429)."""


class EngineStopped(AcornError):
    """The engine was shut down or its thread died (HTTP 503)."""


@dataclass
class TokenLogprob:
    """Log-probability of a sampled token under the model, and of the most likely alternatives.

    Taken from the raw model distribution, log_softmax(logits), before penalties, temperature and
    truncation (as vLLM does by default), so it measures the model, not the sampler settings.
    """

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # (token id, logprob), most likely first


@dataclass
class Event:
    """What one sequence produced in one step.

    `text` is the text that became final (it may be "" while a character or a possible stop string
    is incomplete). The last event of a sequence has `finish_reason` set: "stop" (end-of-text, a stop
    token or a stop string), "length" (max tokens or the context is full), "abort" (cancelled) or
    "error" (then `error` says why).
    """

    text: str = ""
    token_id: int | None = None
    logprob: TokenLogprob | None = None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class SequenceHandle:
    """Returned by `Engine.submit`: lets the caller cancel the sequence (a disconnected client)."""

    def __init__(self, engine: Engine, seq: _Sequence) -> None:
        self._engine = engine
        self._seq = seq

    @property
    def id(self) -> int:
        return self._seq.id

    def cancel(self) -> None:
        """Free the sequence's slot before the next decode step; its last event says "abort"."""
        self._seq.cancelled = True
        self._engine._wake()


@dataclass(eq=False)
class _Sequence:
    """The engine's state of one running or waiting sequence."""

    id: int
    prompt_ids: list[int]
    params: SamplingParams
    top_logprobs: int | None  # None = no logprobs; 0 = the sampled token's only; k = plus the k most likely
    on_event: Callable[[Event], None]
    detok: StreamingDetokenizer
    budget: int  # how many tokens it may generate (max tokens and the context limit)
    sampler: TokenSampler
    ignore_eos: bool = False  # keep going past the engine's stop tokens (benchmarks, tests)
    generated: int = 0
    length: int = 0  # tokens in its KV cache slot
    last_token: int = 0  # the token to feed at the next decode step
    cancelled: bool = False
    done: bool = False  # its final event was sent; nothing more is


class SlotKVCache:
    """A preallocated key/value cache of `num_slots` sequences, each with its own length.

    Buffers are [layers, slots, kv_heads, max_length, head_dim]. Sequences that take part in a
    decode step occupy slots 0..rows-1 (see `Engine`). Two views are handed to the model:

    - `prefill_view(first_slot, count)`: consecutive slots behind the plain `KVCache` interface
      (`length`, `update`, `advance`), used to prefill a batch of prompts together;
    - the cache itself, for a decode step of one new token per row: `update` writes each row's key
      at that row's own position and returns keys up to the longest row; the rows' positions and
      the attention mask (a row sees its own positions only) come from `decode_inputs`.
    """

    def __init__(self, num_layers: int, num_slots: int, num_kv_heads: int, head_dim: int,
                 max_length: int, dtype: torch.dtype, device: torch.device | str) -> None:
        shape = (num_layers, num_slots, num_kv_heads, max_length, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.max_length = max_length
        self.device = torch.device(device)
        self._row_index: torch.Tensor | None = None  # set by decode_inputs for the current step
        self._positions: torch.Tensor | None = None
        self._span = 0

    def prefill_view(self, first_slot: int, count: int = 1) -> _SlotView:
        return _SlotView(self, first_slot, count)

    def decode_inputs(self, lengths: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions [rows, 1] and attention mask [rows, 1, 1, span] of a decode step.

        The new token of row r sits at position lengths[r] and may attend to positions 0..lengths[r].
        """
        rows = len(lengths)
        positions = torch.tensor(lengths, dtype=torch.long, device=self.device)
        self._span = max(lengths) + 1
        self._row_index = torch.arange(rows, device=self.device)
        self._positions = positions
        columns = torch.arange(self._span, device=self.device)
        mask = columns[None, :] <= positions[:, None]
        return positions[:, None], mask[:, None, None, :]

    @property
    def length(self) -> int:
        """The decode step's rows start at different positions; the model reads them from `decode_inputs`."""
        return 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store each row's new key/value [rows, kv_heads, 1, D] at its position; return [rows, kv_heads, span, D]."""
        rows = k.shape[0]
        keys, values = self.keys[layer], self.values[layer]
        keys[self._row_index, :, self._positions] = k[:, :, 0]
        values[self._row_index, :, self._positions] = v[:, :, 0]
        return keys[:rows, :, :self._span], values[:rows, :, :self._span]

    def advance(self, num_tokens: int) -> None:
        """Lengths are kept by the engine, per sequence."""

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` positions of slot `src` into slot `dst` (a sequence changes slot)."""
        self.keys[:, dst, :, :length] = self.keys[:, src, :, :length]
        self.values[:, dst, :, :length] = self.values[:, src, :, :length]


class _SlotView:
    """Consecutive slots of a `SlotKVCache` behind the plain `KVCache` interface (rows that start
    together at position 0: a prefill batch)."""

    def __init__(self, cache: SlotKVCache, first_slot: int, count: int) -> None:
        self.keys = cache.keys[:, first_slot:first_slot + count]  # views: writes land in the shared buffer
        self.values = cache.values[:, first_slot:first_slot + count]
        self.max_length = cache.max_length
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k.shape[2]
        self.keys[layer, :, :, self.length:end] = k
        self.values[layer, :, :, self.length:end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def advance(self, num_tokens: int) -> None:
        self.length += num_tokens


class Engine:
    """Continuous-batching generation over one model, driven by a background thread.

    Usage:

        engine = Engine(model, tokenizer, max_batch=16).start()
        for event in engine.stream(prompt_ids, SamplingParams(max_new_tokens=50, seed=0)):
            print(event.text, end="")
        engine.shutdown()

    or, from an async server, `engine.submit(prompt_ids, params, on_event=callback)` (the callback
    runs on the engine thread and must only hand the event over, e.g. `loop.call_soon_threadsafe`).
    Tests can skip the thread and call `step()` themselves.

    Args:
        model: The `Transformer` (eval mode; its device and dtype are used).
        tokenizer: Its tokenizer (token bytes for streaming text, the vocabulary size to sample from).
        max_batch: Most sequences decoded together (KV cache slots).
        max_queue: Most sequences waiting for a slot; `submit` raises `EngineFull` beyond it.
        stop_token_ids: Tokens that end every sequence (default: <|endoftext|> and <|im_end|>).
        max_context: Most tokens per sequence, prompt and reply together (default: the model's context).
            The KV cache holds max_batch x max_context positions, so this sets its memory.
        prefill_tokens_per_step: Prompt tokens prefilled per step before the running sequences get their
            next token (at least one prompt is always admitted), so a burst of new requests delays the
            streams already running by a bounded amount. The prompts admitted in one step are prefilled
            together in one forward pass, padded to the longest; the budget counts the padded tokens.

    Special tokens (<|im_start|> ...) produce no text, as in vLLM's default `skip_special_tokens`,
    so a reply can be sent back as a chat message as it is.
    """

    def __init__(self, model: Transformer, tokenizer: Tokenizer, *, max_batch: int = 16,
                 max_queue: int | None = None, stop_token_ids: Iterable[int] | None = None,
                 max_context: int | None = None, prefill_tokens_per_step: int = 2048) -> None:
        if not isinstance(max_batch, int) or max_batch < 1:
            raise ConfigError(f"max_batch must be a positive integer, got {max_batch!r}")
        if max_queue is not None and (not isinstance(max_queue, int) or max_queue < 0):
            raise ConfigError(f"max_queue must be an integer >= 0, got {max_queue!r}")
        self.model = accelerate(model.eval(), mode="infer")
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.max_queue = 4 * max_batch if max_queue is None else max_queue
        self.prefill_tokens_per_step = prefill_tokens_per_step
        if max_context is not None and (not isinstance(max_context, int) or max_context < 1):
            raise ConfigError(f"max_context must be a positive integer, got {max_context!r}")
        self.context_length = min(max_context or model.config.max_position_embeddings,
                                  model.config.max_position_embeddings)
        self.vocab_size = min(tokenizer.vocab_size, model.config.vocab_size)
        if stop_token_ids is None:
            stop_token_ids = [tokenizer.eot_id] + [t for t in [tokenizer.token_to_id("<|im_end|>")] if t is not None]
        self.stop_token_ids = set(stop_token_ids)
        self.special_token_ids = {i for i in map(tokenizer.token_to_id, SPECIAL_TOKENS) if i is not None}
        self.device = model.device
        c = model.config
        self.cache = SlotKVCache(c.num_hidden_layers, max_batch, c.num_key_value_heads, c.head_dim,
                                 self.context_length, model.dtype, model.device)
        self.kv_cache_bytes = self.cache.keys.numel() * self.cache.keys.element_size() * 2
        self.decode_steps = 0  # batched forward passes run so far (for tests and /health)
        self.finished = collections.Counter()  # finish reason -> sequences ended that way
        self._rows: list[_Sequence] = []  # running sequences; row i uses cache slot i
        self._waiting: collections.deque[_Sequence] = collections.deque()
        self._cond = threading.Condition()
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._admitting: list[_Sequence] = []  # taken off the queue this step, not all in _rows yet

    # ------------------------------------------------------------------ public interface

    @property
    def num_running(self) -> int:
        return len(self._rows)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def alive(self) -> bool:
        """Whether the engine thread is running (and so will serve submitted sequences)."""
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    @property
    def num_params(self) -> int:
        return self.model.num_params()

    def check_prompt(self, prompt_ids: Sequence[int]) -> None:
        """Raise ConfigError when a prompt cannot be generated from (empty, or longer than the context)."""
        check_prompt(prompt_ids, self.context_length)

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams, *, on_event: Callable[[Event], None],
               top_logprobs: int | None = None, ignore_eos: bool = False) -> SequenceHandle:
        """Queue one sequence (params.num_samples must be 1; submit n times for n samples).

        `on_event` receives the sequence's events on the engine thread, the last one with a finish_reason.
        `top_logprobs`: None = no logprobs, k = the sampled token's and the k most likely tokens' logprobs.
        `ignore_eos`: do not stop at the engine's stop tokens (params.stop_token_ids still apply).
        """
        self.check_prompt(prompt_ids)
        prompt_ids = list(prompt_ids)
        sampler = make_sampler(params, prompt_ids, self.vocab_size, self.device)  # fails here, not on the engine thread
        seq = _Sequence(
            id=next(self._ids), prompt_ids=prompt_ids, params=params, top_logprobs=top_logprobs,
            on_event=on_event, detok=StreamingDetokenizer(self.tokenizer.token_bytes, params.stop),
            budget=new_token_budget(len(prompt_ids), params.max_new_tokens, self.context_length),
            sampler=sampler, ignore_eos=ignore_eos,
        )
        with self._cond:
            if self._stopping:
                raise EngineStopped("the engine is shutting down")
            if len(self._rows) + len(self._waiting) >= self.max_batch + self.max_queue:
                raise EngineFull(
                    f"{len(self._rows)} sequences are running and {len(self._waiting)} waiting (the limit); "
                    "retry later or start the server with a larger --max_batch / --max_queue"
                )
            self._waiting.append(seq)
            self._cond.notify()
        return SequenceHandle(self, seq)

    def stream(self, prompt_ids: Sequence[int], params: SamplingParams,
               top_logprobs: int | None = None, ignore_eos: bool = False) -> Iterator[Event]:
        """Submit one sequence and yield its events as they come (starts the engine thread if needed).

        Leaving the loop early cancels the sequence.
        """
        if self._thread is None:
            self.start()
        events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        handle = self.submit(prompt_ids, params, on_event=events.put, top_logprobs=top_logprobs,
                             ignore_eos=ignore_eos)
        try:
            while True:
                event = events.get()
                yield event
                if event.finished:
                    return
        finally:
            handle.cancel()

    def start(self) -> Engine:
        """Run the engine loop in a daemon thread; returns self."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="acornlm-engine", daemon=True)
            self._thread.start()
        return self

    def shutdown(self) -> None:
        """Stop the loop; every running or waiting sequence ends with finish_reason "abort"."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        for seq in list(self._rows) + list(self._waiting):
            self._emit(seq, Event(finish_reason="abort", prompt_tokens=len(seq.prompt_ids),
                                  completion_tokens=seq.generated))
        self._rows.clear()
        self._waiting.clear()

    @torch.inference_mode()
    def step(self) -> bool:
        """One iteration: drop cancelled sequences, admit waiting ones (prefill), one batched decode.

        Returns False when there was nothing to do.
        """
        self._drop_cancelled()
        admitted = self._admit()
        if self._rows:
            self._decode()
            return True
        return admitted

    # ------------------------------------------------------------------ the loop

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._stopping or self._rows or self._waiting):
                    self._cond.wait()
                if self._stopping:
                    return
            self.step_or_fail()

    def step_or_fail(self) -> None:
        """step(), but an exception ends the running sequences with an error event instead of
        escaping: a failed step (e.g. out of memory) must not kill the server."""
        try:
            self.step()
        except Exception as exc:  # noqa: BLE001
            self._fail_all(f"{type(exc).__name__}: {exc}")

    def _fail_all(self, message: str) -> None:
        """End every running sequence, and every one taken off the queue in this step, with an error
        event (e.g. out of memory in a forward pass): no sequence is left without its final event."""
        rows, self._rows = self._rows, []
        admitting, self._admitting = self._admitting, []
        for seq in rows + admitting:  # a sequence in both gets one event: _emit skips finished ones
            self._emit(seq, Event(finish_reason="error", error=message, prompt_tokens=len(seq.prompt_ids),
                                  completion_tokens=seq.generated))

    def _emit(self, seq: _Sequence, event: Event) -> None:
        """Hand one event to the sequence's consumer; nothing after its final event."""
        if seq.done:
            return
        if event.finished:
            seq.done = True
            self.finished[event.finish_reason] += 1
        try:
            seq.on_event(event)
        except Exception:  # noqa: BLE001 - a broken consumer only loses its own sequence
            seq.cancelled = True

    def _drop_cancelled(self) -> None:
        with self._cond:
            waiting_cancelled = [s for s in self._waiting if s.cancelled]
            for seq in waiting_cancelled:
                self._waiting.remove(seq)
        cancelled = [i for i, s in enumerate(self._rows) if s.cancelled]
        for seq in waiting_cancelled + [self._rows[i] for i in cancelled]:
            self._emit(seq, Event(finish_reason="abort", prompt_tokens=len(seq.prompt_ids),
                                  completion_tokens=seq.generated))
        self._release(cancelled)

    def _admit(self) -> bool:
        """Prefill waiting sequences into free slots, as one padded batch, and sample their first tokens."""
        group = self._take_waiting()
        if not group:
            return False
        self._admitting = group  # if anything below raises, step_or_fail answers every one of them
        try:
            logits = self._prefill(group, first_slot=len(self._rows))
            prefilled = list(zip(group, logits))
        except Exception:  # noqa: BLE001 - e.g. out of memory: find the prompt(s) that fail on their own
            prefilled = self._prefill_one_by_one(group)
        finished = []
        for seq, row_logits in prefilled:
            seq.length = len(seq.prompt_ids)
            self._rows.append(seq)
            try:
                token = int(seq.sampler(row_logits[None]).item())
            except Exception as exc:  # noqa: BLE001 - one sequence's sampler fails: only it ends
                self._emit(seq, Event(finish_reason="error", error=f"{type(exc).__name__}: {exc}",
                                      prompt_tokens=len(seq.prompt_ids)))
                finished.append(len(self._rows) - 1)
                continue
            if not self._accept(seq, token, row_logits):
                finished.append(len(self._rows) - 1)
        self._release(finished)
        self._admitting = []
        return True

    def _take_waiting(self) -> list[_Sequence]:
        """The next waiting sequences that fit in the free slots and in this step's prefill budget,
        counted in padded tokens (each prompt is padded to the longest of the batch); at least one."""
        group: list[_Sequence] = []
        longest = 0
        with self._cond:
            while self._waiting and len(self._rows) + len(group) < self.max_batch:
                padded_length = max(longest, len(self._waiting[0].prompt_ids))
                if group and padded_length * (len(group) + 1) > self.prefill_tokens_per_step:
                    break
                group.append(self._waiting.popleft())
                longest = padded_length
        return group

    def _prefill(self, group: list[_Sequence], first_slot: int) -> torch.Tensor:
        """One forward pass over the prompts of `group` into slots first_slot, first_slot + 1, ...;
        returns the logits [len(group), vocab] at each prompt's last position.

        Prompts are right-padded to the longest and need no mask beyond the causal one: a pad token
        only feeds positions after its prompt's end, and each decode step overwrites the next such
        position before the sequence's own token attends to it.
        """
        lengths = [len(seq.prompt_ids) for seq in group]
        ids = torch.full((len(group), max(lengths)), self.tokenizer.eot_id, dtype=torch.long)
        for row, seq in enumerate(group):
            ids[row, :lengths[row]] = torch.tensor(seq.prompt_ids, dtype=torch.long)
        ids = ids.to(self.device)
        last = torch.tensor(lengths, device=self.device) - 1
        logits = self.model(ids, self.cache.prefill_view(first_slot, len(group)), logits_at=last)
        return logits[:, 0, :self.vocab_size]

    def _prefill_one_by_one(self, group: list[_Sequence]) -> list[tuple[_Sequence, torch.Tensor]]:
        """After a failed batch prefill: each prompt alone, so only a prompt that fails by itself
        ends (with an error event) and the others go on."""
        prefilled = []
        for seq in group:
            try:
                logits = self._prefill([seq], first_slot=len(self._rows) + len(prefilled))
            except Exception as exc:  # noqa: BLE001
                self._emit(seq, Event(finish_reason="error", error=f"{type(exc).__name__}: {exc}",
                                      prompt_tokens=len(seq.prompt_ids)))
                continue
            prefilled.append((seq, logits[0]))
        return prefilled

    def _decode(self) -> None:
        """One forward pass over the last token of every running sequence, then one token each."""
        rows = self._rows
        positions, mask = self.cache.decode_inputs([seq.length for seq in rows])
        last = torch.tensor([[seq.last_token] for seq in rows], dtype=torch.long, device=self.device)
        logits = self.model(last, self.cache, positions=positions, attention_mask=mask)[:, -1, :self.vocab_size]
        self.decode_steps += 1
        for seq in rows:
            seq.length += 1
        tokens = sample_rows(logits, [seq.sampler for seq in rows]).tolist()  # one sync
        finished = [i for i, (seq, token) in enumerate(zip(rows, tokens)) if not self._accept(seq, token, logits[i])]
        self._release(finished)

    def _accept(self, seq: _Sequence, token: int, logits: torch.Tensor) -> bool:
        """Record one sampled token: emit its text, or finish the sequence. Returns False when finished."""
        if token == INVALID_TOKEN:  # its logits turned into nan/inf: this sequence ends, the batch goes on
            self._emit(seq, Event(finish_reason="error", error=numerical_failure(seq.params),
                                  prompt_tokens=len(seq.prompt_ids), completion_tokens=seq.generated))
            return False
        seq.generated += 1
        usage = dict(prompt_tokens=len(seq.prompt_ids), completion_tokens=seq.generated)
        if (token in self.stop_token_ids and not seq.ignore_eos) or token in seq.params.stop_token_ids:
            self._emit(seq, Event(text=seq.detok.flush(), finish_reason="stop", **usage))
            return False
        logprob = self._logprob(token, logits, seq.top_logprobs) if seq.top_logprobs is not None else None
        text = "" if token in self.special_token_ids else seq.detok.push(token)
        if seq.detok.stopped:
            self._emit(seq, Event(text=text, token_id=token, logprob=logprob, finish_reason="stop", **usage))
            return False
        if seq.generated >= seq.budget or seq.cancelled:
            reason = "abort" if seq.cancelled else "length"
            text += seq.detok.flush()
            self._emit(seq, Event(text=text, token_id=token, logprob=logprob, finish_reason=reason, **usage))
            return False
        seq.last_token = token
        self._emit(seq, Event(text=text, token_id=token, logprob=logprob, **usage))
        return True

    @staticmethod
    def _logprob(token: int, logits: torch.Tensor, top: int) -> TokenLogprob:
        """log_softmax of the raw logits: the chosen token's logprob and the `top` most likely."""
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        best: list[tuple[int, float]] = []
        if top > 0:
            values, ids = torch.topk(logprobs, min(top, logprobs.shape[-1]))
            best = list(zip(ids.tolist(), values.tolist()))
        return TokenLogprob(token, float(logprobs[token]), best)

    def _release(self, rows: Iterable[int]) -> None:
        """Remove finished rows; the last running sequence moves into each freed slot (rows stay 0..n-1)."""
        for row in sorted(set(rows), reverse=True):
            last = self._rows.pop()
            if row < len(self._rows):
                self._rows[row] = last
                self.cache.move(len(self._rows), row, last.length)


def check_prompt(prompt_ids: Sequence[int], context_length: int) -> None:
    """Raise ConfigError when a prompt cannot be generated from (empty, or longer than the context)."""
    if not prompt_ids:
        raise ConfigError("the prompt is empty: it needs at least one token")
    if len(prompt_ids) > context_length:
        raise ConfigError(
            f"the prompt has {len(prompt_ids)} tokens but the model's context is {context_length} "
            "tokens; shorten the prompt or the conversation"
        )


def make_sampler(params: SamplingParams, prompt_ids: Sequence[int], vocab_size: int,
                 device: torch.device | str) -> TokenSampler:
    """The sampler of one submitted sequence; ConfigError for settings that cannot be sampled with."""
    if params.num_samples != 1:
        raise ConfigError("submit() takes one sample per sequence: submit the prompt n times for n samples")
    try:
        return TokenSampler(params, prompt_ids, 1, vocab_size, device)
    except (RuntimeError, ValueError) as exc:  # e.g. a seed beyond 64 bits
        raise ConfigError(f"cannot sample with these settings ({exc}); a seed must fit in 64 bits") from exc


def sampling_for_request(params: SamplingParams, index: int) -> SamplingParams:
    """The params of sample `index` of an n-sample request: seed + index, so samples differ yet reproduce."""
    return replace(params, num_samples=1, seed=offset_seed(params.seed, index))
