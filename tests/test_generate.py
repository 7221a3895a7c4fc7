"""Generation: KV-cache equivalence, decoding loop, sampling transforms, streaming, LanguageModel and the CLI."""

import math
import random

import pytest
import torch

import acornlm
from acornlm.cli import main
from acornlm.cli.generate import generate as generate_cli
from acornlm.cli.generate import unescape
from acornlm.cli.terminal import visible
from acornlm.errors import ConfigError
from acornlm.infer import LanguageModel, SamplingParams, StreamingDetokenizer, generate_batch, generate_tokens
from acornlm.infer.sampling import (
    TokenSampler,
    apply_frequency_presence_penalty,
    apply_min_p,
    apply_repetition_penalty,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    draw_tokens,
)
from acornlm.model import ModelConfig, Transformer
from acornlm.model.checkpoint import write_model_files
from acornlm.tokenizer import train_tokenizer

FAMILIES = {
    "rope_gqa": dict(position="rope", norm="rmsnorm", mlp="swiglu", num_key_value_heads=2, qk_norm=True),
    "gpt2": dict(position="learned", norm="layernorm", mlp="gelu", attention_bias=True, mlp_bias=True,
                 norm_eps=1e-5),
}
MULTILINGUAL = "你好，世界！ 👩‍💻 🎉 héllo wörld. Emoji 😀😀 and 中文 text. END of story.\n\nThe end."


def tiny_model(family: str = "rope_gqa", vocab_size: int = 64, context: int = 64, seed: int = 0) -> Transformer:
    """A random tiny model; a large init spread makes its next-token distributions peaked, so argmax has no near-ties."""
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=context, rope_theta=10000.0,
                         initializer_range=0.3, **FAMILIES[family])
    return Transformer(config).eval()


def random_ids(n: int, vocab_size: int = 64, seed: int = 1) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab_size, (n,), generator=g).tolist()


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer([MULTILINGUAL, "plain english words for the tokenizer to merge"] * 3, "bpe", 290)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer):
    """A run directory laid out as the trainer writes it: checkpoints/step-0000010/ and checkpoints/latest."""
    run = tmp_path_factory.mktemp("run")
    tokenizer.save(run / "tokenizer")
    model = tiny_model(vocab_size=tokenizer.vocab_size, seed=3)
    ckpt = run / "checkpoints" / "step-0000010"
    ckpt.mkdir(parents=True)
    write_model_files(ckpt, model, {"step": 10}, tokenizer_dir=run / "tokenizer")
    (run / "checkpoints" / "latest").write_text("step-0000010\n", encoding="utf-8")
    return run, ckpt, model


# --------------------------------------------------------------------------- KV cache


@pytest.mark.parametrize("family", FAMILIES)
def test_kv_cache_decode_matches_full_forward(family):
    model = tiny_model(family)
    ids = torch.tensor([random_ids(12)])
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(1, 12)
        steps = [model(ids[:, :5], cache)]  # prefill
        steps += [model(ids[:, t:t + 1], cache) for t in range(5, 12)]  # one token per step
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_after_cached_prefix_matches_full_forward(family):
    model = tiny_model(family)
    ids = torch.tensor([random_ids(12, seed=2)] * 2)
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2, 12)
        chunks = [model(ids[:, a:b], cache) for a, b in ((0, 4), (4, 9), (9, 10), (10, 12))]
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- decoding loop


def stepwise_argmax(model: Transformer, prompt: list[int], steps: int) -> list[int]:
    """Greedy decoding the slow way: a full forward over the whole sequence for every new token."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_equals_stepwise_argmax_and_is_deterministic(family):
    model = tiny_model(family)
    prompt = random_ids(5, seed=4)
    params = SamplingParams(max_new_tokens=15, temperature=0)
    first = list(generate_tokens(model, prompt, params))
    assert first == stepwise_argmax(model, prompt, 15)
    assert list(generate_tokens(model, prompt, params)) == first


def test_batched_greedy_samples_equal_the_single_sample():
    model = tiny_model()
    prompt = random_ids(6, seed=5)
    single = list(generate_tokens(model, prompt, SamplingParams(max_new_tokens=10, temperature=0)))
    steps = list(generate_batch(model, prompt, SamplingParams(max_new_tokens=10, temperature=0, num_samples=3)))
    assert [list(column) for column in zip(*steps)] == [single] * 3


def test_seed_reproduces_sampling_and_different_seeds_differ():
    model = tiny_model()
    prompt = random_ids(4, seed=6)

    def sample(seed, **kw):
        return list(generate_tokens(model, prompt, SamplingParams(max_new_tokens=20, seed=seed, **kw)))

    assert sample(0) == sample(0)
    assert sample(0) != sample(1)
    assert sample(7, top_k=5, top_p=0.9, min_p=0.05) == sample(7, top_k=5, top_p=0.9, min_p=0.05)
    rows = list(zip(*generate_batch(model, prompt, SamplingParams(max_new_tokens=20, seed=0, num_samples=3))))
    assert len(set(rows)) == 3  # the samples of one batch are independent


def test_generation_stops_at_eos_and_stop_token_ids():
    model = tiny_model()
    prompt = random_ids(5, seed=4)
    greedy = list(generate_tokens(model, prompt, SamplingParams(max_new_tokens=15, temperature=0)))
    cut = next(i for i, t in enumerate(greedy) if i >= 2 and t not in greedy[:i])
    params = SamplingParams(max_new_tokens=15, temperature=0)
    assert list(generate_tokens(model, prompt, params, eos_ids=[greedy[cut]])) == greedy[:cut]
    params = SamplingParams(max_new_tokens=15, temperature=0, stop_token_ids=[greedy[cut]])
    assert list(generate_tokens(model, prompt, params)) == greedy[:cut]


def test_context_limit_truncates_prompt_and_stops_when_full():
    model = tiny_model(context=16)
    params = SamplingParams(max_new_tokens=50, temperature=0)
    assert len(list(generate_tokens(model, random_ids(12), params))) == 16 - 12 + 1
    long_prompt = random_ids(20)
    with pytest.warns(UserWarning, match="keeping its last 16 tokens"):
        out = list(generate_tokens(model, long_prompt, params))
    assert out == stepwise_argmax(model, long_prompt[-16:], 1)
    with pytest.raises(ConfigError, match="empty"):
        list(generate_tokens(model, [], params))


def test_large_presence_penalty_never_repeats_a_generated_token():
    model = tiny_model()
    params = SamplingParams(max_new_tokens=30, temperature=0, presence_penalty=2.0)
    params.presence_penalty = 1e4  # beyond the API's range of [-2, 2], to make the formula's effect certain
    out = list(generate_tokens(model, random_ids(3), params))
    assert len(out) == 30 and len(set(out)) == 30


# --------------------------------------------------------------------------- sampling transforms


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0], [2.0, -1.0, 0.5, 3.0]])
    seen = torch.tensor([[True, True, False, False], [False, False, False, True]])
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert out.tolist() == [[1.0, -2.0, 0.5, 3.0], [2.0, -1.0, 0.5, 1.5]]
    assert logits[0, 0] == 2.0  # pure: the input is untouched


def test_frequency_and_presence_penalties_follow_the_openai_formula():
    logits = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    counts = torch.tensor([[2.0, 0.0, 1.0, 0.0]])
    out = apply_frequency_presence_penalty(logits, counts, frequency_penalty=0.5, presence_penalty=1.0)
    assert out.tolist() == [[1 - 1.0 - 1.0, 1.0, 1 - 0.5 - 1.0, 1.0]]


def test_draw_tokens_follows_the_distribution_and_never_draws_a_zero():
    """Inverse transform sampling: frequencies match the probabilities; a probability-0 token never
    comes up, not even at the ends of [0, 1); rows are independent."""
    probs = torch.tensor([[0.125, 0.0, 0.5, 0.375, 0.0], [0.0, 0.0, 0.0, 0.0, 2.0]])  # rows need not sum to 1
    generator = torch.Generator().manual_seed(0)
    uniforms = torch.rand(20000, dtype=torch.float64, generator=generator)
    tokens = draw_tokens(probs[:1].expand(20000, -1), uniforms)
    frequencies = torch.bincount(tokens, minlength=5).double() / 20000
    assert torch.allclose(frequencies, probs[0].double(), atol=0.015)
    edges = torch.tensor([0.0, 0.125 - 1e-12, 0.125, 1 - 2**-53], dtype=torch.float64)
    assert draw_tokens(probs[:1].expand(4, -1), edges).tolist() == [0, 0, 2, 3]
    assert draw_tokens(probs, torch.tensor([0.5, 0.0], dtype=torch.float64)).tolist() == [2, 4]
    broken = torch.tensor([[0.5, float("nan")], [0.5, 0.5], [0.0, 0.0], [float("inf"), 1.0]])
    assert draw_tokens(broken, torch.full((4,), 0.75, dtype=torch.float64)).tolist() == [-1, 1, -1, -1]


def test_temperature_and_top_k():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0], [5.0, 5.0, 1.0, 4.0]])
    assert apply_temperature(logits, 0.5).tolist() == [[2.0, 6.0, 4.0, 0.0], [10.0, 10.0, 2.0, 8.0]]
    inf = float("-inf")
    assert apply_top_k(logits, 2).tolist() == [[inf, 3.0, 2.0, inf], [5.0, 5.0, inf, inf]]
    assert apply_top_k(logits, 1).tolist() == [[inf, 3.0, inf, inf], [5.0, 5.0, inf, inf]]  # ties kept
    assert torch.equal(apply_top_k(logits, 0), logits)


def test_top_p_keeps_the_smallest_nucleus_in_any_token_order():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.3, 0.15, 0.5]])
    logits = probs.log()
    kept = apply_top_p(logits, 0.7).isfinite().tolist()
    assert kept == [[True, True, False, False], [False, True, False, True]]
    kept = apply_top_p(logits, 0.85).isfinite().tolist()
    assert kept == [[True, True, True, False], [False, True, True, True]]
    assert apply_top_p(logits, 0.1).isfinite().sum(dim=-1).tolist() == [1, 1]  # the top token always stays
    assert torch.equal(apply_top_p(logits, 1.0), logits)


def test_min_p_drops_tokens_below_a_fraction_of_the_top_probability():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    assert apply_min_p(logits, 0.2).isfinite().tolist() == [[True, True, True, False]]
    assert apply_min_p(logits, 0.5).isfinite().tolist() == [[True, True, False, False]]
    kept = apply_min_p(logits, 0.2)
    renormalised = kept.softmax(-1)[0, :3]
    torch.testing.assert_close(renormalised, torch.tensor([0.5, 0.3, 0.15]) / 0.95)


def test_sampler_penalises_prompt_tokens_and_top_k_1_is_greedy():
    logits = torch.tensor([[2.0, 1.5, -1.0, 0.0]])
    greedy = TokenSampler(SamplingParams(temperature=0), [], 1, 4, "cpu")
    assert greedy(logits).tolist() == [0]
    penalised = TokenSampler(SamplingParams(temperature=0, repetition_penalty=2.0), [0], 1, 4, "cpu")
    assert penalised(logits).tolist() == [1]  # 2.0 / 2 = 1.0 < 1.5
    assert penalised.seen.tolist() == [[True, True, False, False]]  # the generated token is now seen too
    top1 = TokenSampler(SamplingParams(temperature=1.5, top_k=1, seed=0), [], 1, 4, "cpu")
    assert [top1(logits).item() for _ in range(5)] == [0] * 5


@pytest.mark.parametrize("kwargs, reason", [
    (dict(temperature=-0.1), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(min_p=1.5), "min_p"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(frequency_penalty=math.inf), "frequency_penalty"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(num_samples=0), "num_samples"),
    (dict(stop=[""]), "stop"),
    (dict(seed=1.5), "seed"),
    (dict(temprature=0.5), "valid options: .*temperature"),
])
def test_bad_sampling_params_raise_config_error(kwargs, reason):
    with pytest.raises(ConfigError, match=reason):
        SamplingParams.from_kwargs(**kwargs)


# --------------------------------------------------------------------------- streaming


def longest_valid_utf8_prefix(data: bytes) -> str:
    for cut in range(len(data), -1, -1):
        try:
            return data[:cut].decode("utf-8")
        except UnicodeDecodeError:
            continue
    return ""


def test_streaming_never_splits_a_character_and_concatenates_to_the_decode(tokenizer):
    ids = tokenizer.encode(MULTILINGUAL)
    pieces_bytes = [tokenizer.token_bytes(i) for i in ids]
    assert any(not _is_utf8(b) for b in pieces_bytes), "the test needs characters split across tokens"
    detok = StreamingDetokenizer(tokenizer.token_bytes)
    shown, pieces = "", []
    for n, token in enumerate(ids, start=1):
        piece = detok.push(token)
        pieces.append(piece)
        shown += piece
        # everything whole is shown at once; only an unfinished character is held back
        assert shown == longest_valid_utf8_prefix(b"".join(pieces_bytes[:n]))
    pieces.append(detok.flush())
    assert "".join(pieces) == tokenizer.decode(ids) == MULTILINGUAL
    assert all("\ufffd" not in p for p in pieces)


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_streaming_random_tokens_matches_the_tokenizer_decode(tokenizer):
    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.randrange(3, tokenizer.vocab_size) for _ in range(rng.randrange(1, 10))]
        detok = StreamingDetokenizer(tokenizer.token_bytes)
        assert "".join(detok.push(t) for t in ids) + detok.flush() == tokenizer.decode(ids)


def test_incomplete_character_at_the_end_becomes_a_replacement_character():
    table = {0: "你".encode()[:2], 1: b"ok"}
    detok = StreamingDetokenizer(table.__getitem__)
    assert detok.push(1) == "ok"
    assert detok.push(0) == ""
    assert detok.flush() == "\ufffd"


def test_stop_string_is_never_leaked_while_streaming():
    tokens = [b"Hel", b"lo E", b"N", b"x E", b"N", b"D", b" more"]
    detok = StreamingDetokenizer(tokens.__getitem__, stop=["END", "\n\n"])
    pieces = [detok.push(i) for i in range(len(tokens))]
    # "E" and "EN" are held back while they may still become "END"; "x" shows the first was no stop
    assert pieces == ["Hel", "lo ", "", "ENx ", "", "", ""]
    assert detok.stopped and detok.flush() == ""


def test_stop_string_split_across_multibyte_tokens():
    text = "答：好。\n\n下一个"
    raw = text.encode()
    tokens = [raw[i:i + 2] for i in range(0, len(raw), 2)]  # cut through characters and the stop
    detok = StreamingDetokenizer(tokens.__getitem__, stop=["\n\n下"])
    out = "".join(detok.push(i) for i in range(len(tokens))) + detok.flush()
    assert out == "答：好。"


# --------------------------------------------------------------------------- LanguageModel and CLI


def test_load_generates_like_the_in_memory_model(checkpoint, tokenizer):
    run, ckpt, model = checkpoint
    lm = acornlm.load(run, device="cpu")
    assert isinstance(lm, LanguageModel) and lm.config.vocab_size == tokenizer.vocab_size
    prompt = "héllo wörld"
    expected_ids = list(generate_tokens(model, tokenizer.encode(prompt), SamplingParams(max_new_tokens=20, temperature=0),
                                        eos_ids=[tokenizer.eot_id]))
    text = lm.generate(prompt, max_new_tokens=20, temperature=0)
    assert text == tokenizer.decode(expected_ids)
    assert acornlm.load(ckpt, device="cpu").generate(prompt, max_new_tokens=20, temperature=0) == text
    assert "".join(lm.stream(prompt, max_new_tokens=20, temperature=0)) == text
    assert lm.decode(lm.encode(MULTILINGUAL)) == MULTILINGUAL
    assert lm.generate(prompt, max_new_tokens=12, seed=5) == lm.generate(prompt, max_new_tokens=12, seed=5)
    samples = lm.generate(prompt, max_new_tokens=12, seed=5, num_samples=3)
    assert isinstance(samples, list) and len(samples) == 3 and len(set(samples)) == 3
    assert isinstance(lm.generate("", max_new_tokens=3, temperature=0), str)  # empty prompt starts a document
    with pytest.raises(ConfigError, match="valid options"):
        lm.generate(prompt, max_tokens=5)


def test_stop_string_ends_the_generated_text(checkpoint):
    run, _, _ = checkpoint
    lm = acornlm.load(run, device="cpu")
    full = lm.generate("你好", max_new_tokens=30, temperature=0)
    assert len(full) >= 6
    stop = full[3:5]
    expected = full[:full.find(stop)]
    assert lm.generate("你好", max_new_tokens=30, temperature=0, stop=[stop, "never-there"]) == expected
    pieces = list(lm.stream("你好", max_new_tokens=30, temperature=0, stop=stop))
    assert "".join(pieces) == expected and stop not in "".join(pieces)


class RecordingStdout:
    """Stands in for sys.stdout and remembers every write, to show the CLI prints while generating."""

    def __init__(self) -> None:
        self.writes: list[str] = []
        self.flushes = 0

    def write(self, text: str) -> int:
        self.writes.append(text)
        return len(text)

    def flush(self) -> None:
        self.flushes += 1


def test_cli_streams_the_continuation_to_stdout(checkpoint, capsys, monkeypatch):
    run, _, _ = checkpoint
    expected = acornlm.load(run, device="cpu").generate("héllo", max_new_tokens=15, seed=2, temperature=0.8)
    generate_cli(ckpt=str(run), prompt="héllo", max_new_tokens=15, seed=2, device="cpu")
    assert capsys.readouterr().out == "héllo" + visible(expected) + "\n"

    recorder = RecordingStdout()
    monkeypatch.setattr("sys.stdout", recorder)
    generate_cli(ckpt=str(run), prompt="héllo", max_new_tokens=15, seed=2, device="cpu")
    assert len([w for w in recorder.writes if w]) > 3 and recorder.flushes > 3


def test_cli_separates_samples_and_reads_a_prompt_file(checkpoint, capsys, tmp_path):
    run, _, _ = checkpoint
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text("你好", encoding="utf-8")
    generate_cli(ckpt=str(run), prompt_file=str(prompt_file), max_new_tokens=8, seed=1, num_samples=2,
                 device="cpu")
    out = capsys.readouterr().out
    samples = acornlm.load(run, device="cpu").generate("你好", max_new_tokens=8, seed=1, num_samples=2,
                                                        temperature=0.8)
    assert out.count("sample 1/2") == 1 and out.count("sample 2/2") == 1
    assert out.split("\n", 1)[1].startswith("你好" + visible(samples[0]) + "\n")
    assert out.endswith("你好" + visible(samples[1]) + "\n")


def test_cli_reports_missing_options(checkpoint):
    run, _, _ = checkpoint
    with pytest.raises(ConfigError, match="--ckpt"):
        generate_cli(prompt="x")
    with pytest.raises(ConfigError, match="--prompt"):
        generate_cli(ckpt=str(run))
    with pytest.raises(ConfigError, match="temperature"):
        generate_cli(ckpt=str(run), prompt="x", temperature=-1.0, device="cpu")


def test_cli_command_line_joins_prompt_words_and_unescapes_stop(checkpoint, capsys):
    run, _, _ = checkpoint
    lm = acornlm.load(run, device="cpu")
    full = lm.generate("héllo wörld", max_new_tokens=12, temperature=0)
    stop = full[2:4]
    main(["generate", "--ckpt", str(run), "--prompt", "héllo", "wörld", "--max-new-tokens", "12",
          "--temperature", "0", "--stop", stop, "\\n\\n", "--device", "cpu"])
    assert capsys.readouterr().out == "héllo wörld" + visible(full[:full.find(stop)]) + "\n"
    assert unescape("a\\nb\\tc\\\\n") == "a\nb\tc\\n"
