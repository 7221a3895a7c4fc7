"""The continuous-batching engine: batched = unbatched per sequence, joins/leaves, cancel, streaming text."""

import threading

import pytest
import torch

from acornlm.errors import ConfigError, GenerationError
from acornlm.infer.engine import Engine, EngineFull, Event, SlotKVCache
from acornlm.infer.generate import generate_tokens
from acornlm.infer.sampling import INVALID_TOKEN, SamplingParams, TokenSampler, sample_rows
from acornlm.model import ModelConfig, Transformer
from acornlm.tokenizer import train_tokenizer

FAMILIES = {
    "rope_gqa": dict(position="rope", norm="rmsnorm", mlp="swiglu", num_key_value_heads=2, qk_norm=True),
    "gpt2": dict(position="learned", norm="layernorm", mlp="gelu", attention_bias=True, mlp_bias=True,
                 norm_eps=1e-5),
    "moe": dict(num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                num_shared_experts=1),
}
MULTILINGUAL = "你好，世界！ 👩‍💻 🎉 héllo wörld. Emoji 😀😀 and 中文 text. The king and the queen."


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer():
    # A small vocabulary keeps most CJK characters and emoji split across several byte tokens.
    return train_tokenizer([MULTILINGUAL, "plain english words for the tokenizer to merge"] * 3, "bpe", 280)


def tiny_model(vocab_size: int, family: str = "rope_gqa", context: int = 96, seed: int = 0) -> Transformer:
    """A random tiny model; a wide init makes next-token distributions peaked (no near-ties in argmax)."""
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=context, rope_theta=10000.0,
                         initializer_range=0.3, **FAMILIES[family])
    return Transformer(config).eval()


class Collector:
    """on_event callback that records every event of one sequence."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def __call__(self, event: Event) -> None:
        self.events.append(event)

    @property
    def tokens(self) -> list[int]:
        return [e.token_id for e in self.events if e.token_id is not None]

    @property
    def text(self) -> str:
        return "".join(e.text for e in self.events)

    @property
    def finish_reason(self) -> str | None:
        return self.events[-1].finish_reason if self.events else None


def run_until_idle(engine: Engine, limit: int = 10_000) -> None:
    for _ in range(limit):
        if not engine.step():
            return
    raise AssertionError("the engine never went idle")


REQUESTS = [  # (prompt, sampling settings): different lengths and every sampling feature
    ("the king", dict(max_new_tokens=12, temperature=0.0)),
    ("你好，世界！ and more words here", dict(max_new_tokens=20, temperature=1.0, seed=1, top_k=20)),
    ("héllo", dict(max_new_tokens=7, temperature=0.9, seed=2, top_p=0.8, min_p=0.05)),
    ("🎉", dict(max_new_tokens=25, temperature=0.0, repetition_penalty=1.3)),
    ("The queen and the king of a long prompt that runs on", dict(max_new_tokens=16, temperature=1.2, seed=3,
                                                                  frequency_penalty=0.5, presence_penalty=0.5)),
    ("a song", dict(max_new_tokens=14, temperature=0.7, seed=4)),  # plain temperature sampling: batched rows
    ("the river", dict(max_new_tokens=9, temperature=1.5, seed=5)),
]


def test_sample_rows_picks_what_each_sampler_picks_alone():
    """Rows sampled together (plain ones in one pass) get the tokens their own samplers give."""
    settings = [dict(temperature=0.0), dict(temperature=0.8, seed=1), dict(temperature=1.3, seed=2),
                dict(temperature=1.0, seed=3, top_k=5), dict(temperature=0.0, repetition_penalty=1.5),
                dict(temperature=0.8, seed=4)]

    def samplers():
        return [TokenSampler(SamplingParams(**kw), [1, 2, 3], 1, 50, "cpu") for kw in settings]

    together, alone = samplers(), samplers()
    assert [s.plain for s in together] == [True, True, True, False, False, True]
    torch.manual_seed(0)
    for _ in range(20):  # the generators move on from step to step
        logits = torch.randn(len(settings), 50) * 2
        expected = torch.cat([sampler(logits[i:i + 1]) for i, sampler in enumerate(alone)])
        assert torch.equal(sample_rows(logits, together), expected)
    broken = torch.zeros(2, 50)
    broken[1, 0] = float("nan")
    assert sample_rows(broken, samplers()[1:3])[1] == INVALID_TOKEN  # that row alone is marked failed
    assert sample_rows(broken, samplers()[0:2])[1] == INVALID_TOKEN  # greedy rows too


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_generation_matches_unbatched(tokenizer, family):
    """Seven requests through a 3-slot engine (four join later; sequences leave and change slots)
    give exactly the tokens each request gets alone."""
    model = tiny_model(tokenizer.vocab_size, family)
    engine = Engine(model, tokenizer, max_batch=3, stop_token_ids=[])
    collectors = []
    for prompt, settings in REQUESTS:
        collectors.append(Collector())
        engine.submit(tokenizer.encode(prompt), SamplingParams(**settings), on_event=collectors[-1])
    run_until_idle(engine)
    for (prompt, settings), got in zip(REQUESTS, collectors):
        alone = list(generate_tokens(model, tokenizer.encode(prompt), SamplingParams(**settings)))
        assert got.tokens == alone
        assert got.finish_reason == "length" and len(got.tokens) == settings["max_new_tokens"]
    # batching happened: fewer forward passes than tokens
    assert engine.decode_steps < sum(len(c.tokens) for c in collectors) - len(REQUESTS)
    assert engine.num_running == 0 and engine.finished["length"] == len(REQUESTS)


def test_sequences_join_and_leave_between_decode_steps(tokenizer):
    model = tiny_model(tokenizer.vocab_size)
    engine = Engine(model, tokenizer, max_batch=4, stop_token_ids=[])
    long, short, late = Collector(), Collector(), Collector()
    greedy = dict(temperature=0.0)
    engine.submit(tokenizer.encode("the king"), SamplingParams(max_new_tokens=30, **greedy), on_event=long)
    engine.submit(tokenizer.encode("你好"), SamplingParams(max_new_tokens=3, **greedy), on_event=short)
    engine.step()  # both prefilled (1 token each) + one decode step
    assert engine.num_running == 2 and len(long.tokens) == 2
    engine.step()
    assert engine.num_running == 1 and short.finish_reason == "length"  # left after its 3rd token
    engine.step()
    engine.submit(tokenizer.encode("héllo wörld"), SamplingParams(max_new_tokens=5, **greedy), on_event=late)
    assert engine.num_waiting == 1
    engine.step()  # joins the running batch before the next decode
    assert engine.num_running == 2 and engine.num_waiting == 0 and len(late.tokens) == 2
    run_until_idle(engine)
    for collector, prompt, n in ((long, "the king", 30), (short, "你好", 3), (late, "héllo wörld", 5)):
        alone = list(generate_tokens(model, tokenizer.encode(prompt), SamplingParams(max_new_tokens=n, **greedy)))
        assert collector.tokens == alone


def test_prefill_budget_admits_a_burst_over_several_steps(tokenizer):
    engine = Engine(tiny_model(tokenizer.vocab_size), tokenizer, max_batch=8, stop_token_ids=[],
                    prefill_tokens_per_step=10)
    for _ in range(3):
        engine.submit(list(range(3, 9)), SamplingParams(max_new_tokens=20), on_event=Collector())
    running = []
    for _ in range(3):
        engine.step()
        running.append(engine.num_running)
    assert running == [1, 2, 3]  # 6-token prompts, 10 prompt tokens per step: one prompt per step


def test_cancel_frees_the_slot_before_the_next_step(tokenizer):
    model = tiny_model(tokenizer.vocab_size)
    engine = Engine(model, tokenizer, max_batch=2, stop_token_ids=[])
    kept, dropped = Collector(), Collector()
    engine.submit(tokenizer.encode("the"), SamplingParams(max_new_tokens=40, temperature=0.0), on_event=kept)
    handle = engine.submit(tokenizer.encode("king"), SamplingParams(max_new_tokens=40), on_event=dropped)
    engine.step()
    handle.cancel()
    engine.step()
    assert engine.num_running == 1
    assert dropped.finish_reason == "abort" and len(dropped.tokens) == 2
    run_until_idle(engine)
    alone = list(generate_tokens(model, tokenizer.encode("the"), SamplingParams(max_new_tokens=40, temperature=0.0)))
    assert kept.tokens == alone  # the surviving row moved slots and kept its cache


class ScriptedModel(Transformer):
    """A real Transformer (so the KV cache paths run) whose logits then force a scripted continuation:
    after the token at position p, the next token is script[p] (prompts are one token long)."""

    def __init__(self, config: ModelConfig, script: list[int]) -> None:
        super().__init__(config)
        self.script = script

    def forward(self, input_ids, cache=None, positions=None, attention_mask=None, logits_at=None):
        logits = super().forward(input_ids, cache, positions=positions, attention_mask=attention_mask,
                                 logits_at=logits_at)
        if positions is not None:
            last = positions[:, -1].tolist()
        else:
            last = [cache.length - 1 if cache is not None else input_ids.shape[1] - 1] * input_ids.shape[0]
        forced = torch.zeros_like(logits[:, -1])
        for row, position in enumerate(last):
            forced[row, self.script[min(position, len(self.script) - 1)]] = 50.0
        return torch.cat([logits[:, :-1], forced[:, None]], dim=1)


def scripted_engine(tokenizer, text: str, **engine_options) -> tuple[Engine, list[int]]:
    script = tokenizer.encode(text) + [tokenizer.token_to_id("<|im_end|>")]
    config = ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=128)
    return Engine(ScriptedModel(config, script).eval(), tokenizer, **engine_options), script


def test_streamed_pieces_join_to_the_text_for_chinese_and_emoji(tokenizer):
    engine, script = scripted_engine(tokenizer, MULTILINGUAL, max_batch=2)
    split_chars = sum(1 for t in script if tokenizer.token_bytes(t) and not _is_whole_utf8(tokenizer.token_bytes(t)))
    assert split_chars > 3  # the test means something: characters really are split across tokens
    got = Collector()
    engine.submit([tokenizer.eot_id], SamplingParams(max_new_tokens=200, temperature=0.0), on_event=got)
    run_until_idle(engine)
    assert got.text == MULTILINGUAL  # every piece is whole characters and nothing is lost
    assert "\ufffd" not in got.text
    assert got.finish_reason == "stop"  # at <|im_end|>, which is not shown
    assert len([e for e in got.events if e.text]) > 10  # really streamed, not one piece at the end


def _is_whole_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_stop_string_ends_the_sequence_without_leaking_its_prefix(tokenizer):
    engine, _ = scripted_engine(tokenizer, MULTILINGUAL, max_batch=1)
    got = Collector()
    engine.submit([tokenizer.eot_id], SamplingParams(max_new_tokens=200, temperature=0.0, stop=["Emoji 😀"]),
                  on_event=got)
    run_until_idle(engine)
    expected = MULTILINGUAL[:MULTILINGUAL.index("Emoji 😀")]
    assert got.text == expected and got.finish_reason == "stop"  # no piece of "Emoji 😀" was ever sent
    assert engine.num_running == 0


def test_ignore_eos_and_special_tokens_make_no_text(tokenizer):
    engine, script = scripted_engine(tokenizer, "hi", max_batch=1)
    got = Collector()
    engine.submit([tokenizer.eot_id], SamplingParams(max_new_tokens=6, temperature=0.0), on_event=got,
                  ignore_eos=True)
    run_until_idle(engine)
    assert got.finish_reason == "length" and len(got.events) == 6
    assert got.text == "hi"  # the repeated <|im_end|> tokens produced no text


def test_logprobs_are_the_model_distribution(tokenizer):
    model = tiny_model(tokenizer.vocab_size)
    engine = Engine(model, tokenizer, max_batch=2, stop_token_ids=[])
    got = Collector()
    prompt = tokenizer.encode("the king")
    engine.submit(prompt, SamplingParams(max_new_tokens=4, temperature=0.0), on_event=got, top_logprobs=3)
    run_until_idle(engine)
    with torch.no_grad():
        full = model(torch.tensor([prompt + got.tokens]))[0, len(prompt) - 1:-1, :tokenizer.vocab_size]
    expected = torch.log_softmax(full, dim=-1)
    for step, event in enumerate(got.events):
        lp = event.logprob
        assert lp.token_id == event.token_id
        assert lp.logprob == pytest.approx(expected[step, event.token_id].item(), abs=1e-4)
        assert [t for t, _ in lp.top][0] == event.token_id  # greedy picked the most likely token
        assert len(lp.top) == 3 and [v for _, v in lp.top] == sorted((v for _, v in lp.top), reverse=True)


def test_limits_and_bad_requests(tokenizer):
    model = tiny_model(tokenizer.vocab_size, context=16)
    engine = Engine(model, tokenizer, max_batch=1, max_queue=1)
    with pytest.raises(ConfigError, match="context"):
        engine.submit(list(range(3, 20)), SamplingParams(), on_event=Collector())
    with pytest.raises(ConfigError, match="empty"):
        engine.submit([], SamplingParams(), on_event=Collector())
    with pytest.raises(ConfigError, match="n samples"):
        engine.submit([5], SamplingParams(num_samples=2), on_event=Collector())
    engine.submit([5], SamplingParams(), on_event=Collector())
    engine.submit([6], SamplingParams(), on_event=Collector())
    with pytest.raises(EngineFull):
        engine.submit([7], SamplingParams(), on_event=Collector())
    with pytest.raises(ConfigError, match="max_batch"):
        Engine(model, tokenizer, max_batch=0)


def test_context_limit_ends_with_length(tokenizer):
    model = tiny_model(tokenizer.vocab_size, context=16)
    engine = Engine(model, tokenizer, max_batch=2, stop_token_ids=[])
    got = Collector()
    engine.submit(list(range(3, 13)), SamplingParams(max_new_tokens=100, temperature=0.0), on_event=got)
    run_until_idle(engine)
    assert len(got.tokens) == 16 - 10 + 1 and got.finish_reason == "length"  # the last token is never fed back


def test_max_context_caps_prompt_reply_and_cache(tokenizer):
    model = tiny_model(tokenizer.vocab_size, context=96)
    engine = Engine(model, tokenizer, max_batch=2, stop_token_ids=[], max_context=20)
    c = model.config
    assert engine.kv_cache_bytes == 2 * c.num_hidden_layers * 2 * c.num_key_value_heads * 20 * c.head_dim * 4
    with pytest.raises(ConfigError, match="context is 20"):
        engine.submit(list(range(3, 24)), SamplingParams(), on_event=Collector())
    got = Collector()
    engine.submit(list(range(3, 18)), SamplingParams(max_new_tokens=100, temperature=0.0), on_event=got)
    run_until_idle(engine)
    assert len(got.tokens) == 20 - 15 + 1 and got.finish_reason == "length"
    assert Engine(model, tokenizer, max_context=500).context_length == 96  # never beyond the model's


def test_threaded_streams_match_unbatched(tokenizer):
    model = tiny_model(tokenizer.vocab_size)
    engine = Engine(model, tokenizer, max_batch=4, stop_token_ids=[]).start()
    results: dict[int, list[int]] = {}

    def worker(i: int) -> None:
        params = SamplingParams(max_new_tokens=15, temperature=1.0, seed=i)
        results[i] = [e.token_id for e in engine.stream(tokenizer.encode("the king"), params) if e.token_id is not None]

    try:
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        engine.shutdown()
    for i in range(8):
        alone = list(generate_tokens(model, tokenizer.encode("the king"),
                                     SamplingParams(max_new_tokens=15, temperature=1.0, seed=i)))
        assert results[i] == alone
    assert len({tuple(r) for r in results.values()}) > 1  # different seeds, different samples


def test_slot_cache_move_copies_one_sequence():
    cache = SlotKVCache(num_layers=2, num_slots=3, num_kv_heads=1, head_dim=2, max_length=5,
                        dtype=torch.float32, device="cpu")
    cache.keys[:, 2, :, :3] = 7.0
    cache.values[:, 2, :, :3] = 8.0
    cache.move(src=2, dst=0, length=3)
    assert torch.all(cache.keys[:, 0, :, :3] == 7.0) and torch.all(cache.values[:, 0, :, :3] == 8.0)
    assert torch.all(cache.keys[:, 0, :, 3:] == 0.0)


def test_a_failed_prefill_ends_only_its_own_sequence(tokenizer):
    """A prompt whose prefill fails (e.g. out of memory) gets an error event; the batch goes on."""
    model = tiny_model(tokenizer.vocab_size)
    poison = 7
    real_forward = model.forward

    def forward(input_ids, *args, **kwargs):
        if input_ids.shape[1] > 1 and bool((input_ids == poison).any()):
            raise RuntimeError("simulated out of memory")
        return real_forward(input_ids, *args, **kwargs)

    model.forward = forward
    engine = Engine(model, tokenizer, max_batch=3, stop_token_ids=[])
    greedy = SamplingParams(max_new_tokens=6, temperature=0.0)
    first, failed, last = Collector(), Collector(), Collector()
    engine.submit(tokenizer.encode("the king"), greedy, on_event=first)
    engine.submit([poison, 20, 21], greedy, on_event=failed)
    engine.submit(tokenizer.encode("héllo"), greedy, on_event=last)
    run_until_idle(engine)
    assert failed.finish_reason == "error" and "simulated out of memory" in failed.events[-1].error
    assert failed.tokens == [] and engine.finished["error"] == 1
    for collector, prompt in ((first, "the king"), (last, "héllo")):
        assert collector.finish_reason == "length"
        assert collector.tokens == list(generate_tokens(model, tokenizer.encode(prompt), greedy))


def test_waiting_prompts_are_prefilled_together_in_one_forward_pass(tokenizer):
    model = tiny_model(tokenizer.vocab_size)
    calls = []
    real_forward = model.forward

    def forward(input_ids, *args, **kwargs):
        calls.append(tuple(input_ids.shape))
        return real_forward(input_ids, *args, **kwargs)

    model.forward = forward
    engine = Engine(model, tokenizer, max_batch=4, stop_token_ids=[])
    prompts = ["the king", "你好，世界！ and more", "🎉"]
    collectors = [Collector() for _ in prompts]
    greedy = SamplingParams(max_new_tokens=5, temperature=0.0)
    for prompt, collector in zip(prompts, collectors):
        engine.submit(tokenizer.encode(prompt), greedy, on_event=collector)
    engine.step()
    longest = max(len(tokenizer.encode(p)) for p in prompts)
    assert calls == [(3, longest), (3, 1)]  # one padded prefill of all three, then one decode step
    run_until_idle(engine)
    model.forward = real_forward
    for prompt, collector in zip(prompts, collectors):  # padding changed nothing
        assert collector.tokens == list(generate_tokens(model, tokenizer.encode(prompt), greedy))


def unchecked(**settings) -> SamplingParams:
    """SamplingParams with values the API refuses, set after validation: the engine's own guard is tested."""
    params = SamplingParams(max_new_tokens=8, temperature=1.0, seed=0)
    for name, value in settings.items():
        setattr(params, name, value)
    return params


OVERFLOWING = [  # each turns the sampler's logits into inf/nan
    dict(frequency_penalty=1e39),
    dict(presence_penalty=-1e39),
    dict(repetition_penalty=1e-300),
    dict(repetition_penalty=1e-300, temperature=0.0),
    dict(presence_penalty=float("nan"), top_k=5),
]


def test_sampling_ranges_are_checked_and_a_tiny_temperature_is_greedy():
    for bad in (dict(temperature=2.5), dict(temperature=-1), dict(frequency_penalty=1e39),
                dict(presence_penalty=-2.01), dict(repetition_penalty=1e-300), dict(repetition_penalty=1e3),
                dict(seed=2**64), dict(num_samples=10**6), dict(temperature=float("nan"))):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            SamplingParams(**bad)
    assert SamplingParams(temperature=1e-50).greedy and not SamplingParams(temperature=1e-3).greedy
    assert SamplingParams(seed=2**64 - 1, frequency_penalty=2, presence_penalty=-2, repetition_penalty=0.01)


@pytest.mark.parametrize("settings", OVERFLOWING, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_a_sequence_whose_sampling_overflows_ends_alone_and_the_batch_goes_on(tokenizer, settings):
    """The engine's own guard: a poisoned sequence ends with an error event, whether it joins
    running streams (decode) or is prefilled together with others (admission); the others finish
    exactly as if they had been alone, and every slot is free afterwards."""
    model = tiny_model(tokenizer.vocab_size)
    engine = Engine(model, tokenizer, max_batch=4, max_queue=2, stop_token_ids=[])
    greedy = SamplingParams(max_new_tokens=10, temperature=0.0)
    sampled = SamplingParams(max_new_tokens=10, temperature=0.8, seed=3)
    prompts = ["the king", "你好，世界！", "héllo wörld"]
    good = [Collector() for _ in prompts]
    engine.submit(tokenizer.encode(prompts[0]), greedy, on_event=good[0])
    engine.step()  # the first stream is running; the rest are admitted together with the poisoned one
    bad = Collector()
    engine.submit(tokenizer.encode(prompts[1]), sampled, on_event=good[1])
    engine.submit(tokenizer.encode("the queen the queen"), unchecked(**settings), on_event=bad)
    engine.submit(tokenizer.encode(prompts[2]), greedy, on_event=good[2])
    run_until_idle(engine)
    assert bad.finish_reason == "error" and "nan/inf" in bad.events[-1].error
    assert [e.finished for e in bad.events].count(True) == 1
    for collector, prompt, params in zip(good, prompts, (greedy, sampled, greedy)):
        assert collector.finish_reason == "length"
        assert collector.tokens == list(generate_tokens(model, tokenizer.encode(prompt), params))
    assert engine.num_running == engine.num_waiting == 0 and engine.finished == {"length": 3, "error": 1}
    full = [Collector() for _ in range(engine.max_batch + engine.max_queue)]  # capacity is whole again
    for collector in full:
        engine.submit(tokenizer.encode("the"), greedy, on_event=collector)
    with pytest.raises(EngineFull):
        engine.submit(tokenizer.encode("the"), greedy, on_event=Collector())
    run_until_idle(engine)
    assert all(c.finish_reason == "length" for c in full)
    with pytest.raises(GenerationError, match="nan/inf"):  # the Python API says so too
        list(generate_tokens(model, tokenizer.encode("the queen"), unchecked(**settings)))


def test_every_sequence_taken_off_the_queue_gets_a_final_event(tokenizer):
    """Whatever fails during admission (here: one sampler raises, then the whole step raises),
    each sequence taken off the queue hears how it ended, and the engine goes on serving."""
    model = tiny_model(tokenizer.vocab_size)
    engine = Engine(model, tokenizer, max_batch=4, stop_token_ids=[])
    greedy = SamplingParams(max_new_tokens=4, temperature=0.0)
    broken, fine = Collector(), Collector()
    engine.submit(tokenizer.encode("the king"), greedy, on_event=broken)
    engine.submit(tokenizer.encode("héllo"), greedy, on_event=fine)

    def explode(logits):
        raise RuntimeError("sampler bug")

    engine._waiting[0].sampler = explode
    run_until_idle(engine)
    assert broken.finish_reason == "error" and "sampler bug" in broken.events[-1].error
    assert fine.finish_reason == "length" and len(fine.tokens) == 4

    collectors = [Collector() for _ in range(3)]
    for collector in collectors:
        engine.submit(tokenizer.encode("the queen"), greedy, on_event=collector)
    engine._accept = lambda *args: (_ for _ in ()).throw(RuntimeError("step failed"))
    engine.step_or_fail()  # admission raises after the prefill, at the first of three: none may be left unanswered
    del engine._accept
    assert [c.finish_reason for c in collectors] == ["error"] * 3
    assert all("step failed" in c.events[-1].error for c in collectors)
    assert engine.num_running == engine.num_waiting == 0
    later = Collector()
    engine.submit(tokenizer.encode("the"), greedy, on_event=later)
    run_until_idle(engine)
    assert later.finish_reason == "length"
