"""GGUF export: read every file back with gguf.GGUFReader and check that metadata, tokenizer and
every tensor equal the checkpoint's, and that a small numpy re-implementation of llama.cpp's graphs
(interleaved RoPE for `llama`, NeoX RoPE for `qwen3`, fused QKV for `gpt2`) run on the file's
tensors gives acornlm's logits. Plus every refusal: existing output, types a model cannot take,
char-level tokenizers and architectures llama.cpp cannot represent, none leaving a file behind."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from acornlm.errors import ConfigError
from acornlm.model import ModelConfig, Transformer
from acornlm.model.checkpoint import write_model_files
from acornlm.tokenizer import train_tokenizer

gguf = pytest.importorskip("gguf")
from acornlm.export.gguf import export_gguf  # noqa: E402
from acornlm.tokenizer.chat_template import CHAT_TEMPLATE  # noqa: E402
from acornlm.tokenizer.special_tokens import CHAT_TOKENS  # noqa: E402

WORDS = ("the king queen castle river stone green light night sword song walks speaks "
         "café naïve 你好 世界 學習 🙂 🚀 don't it's 2024 3.14").split()

BASE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, rope_theta=10000.0, norm_eps=1e-5)
GPT2 = dict(BASE, intermediate_size=128, norm="layernorm", mlp="gelu", position="learned",
            attention_bias=True, mlp_bias=True)
VARIANTS = {  # name -> (config fields, extra token embeddings beyond the tokenizer's vocabulary)
    "llama": (dict(BASE), 4),  # a padded vocabulary: 4 embedding rows no token uses
    "llama-bias": (dict(BASE, attention_bias=True, mlp_bias=True, tie_word_embeddings=False), 0),
    "qwen3": (dict(BASE, qk_norm=True, head_dim=24, rope_theta=1e6, tie_word_embeddings=False), 0),
    "gpt2": (dict(GPT2), 0),
    "gpt2-nobias": (dict(GPT2, attention_bias=False, mlp_bias=False, norm_bias=False, num_key_value_heads=4), 0),
}
ARCH = {"llama": "llama", "llama-bias": "llama", "qwen3": "qwen3", "gpt2": "gpt2", "gpt2-nobias": "gpt2"}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    rng = random.Random(0)
    docs = [" ".join(rng.choice(WORDS) for _ in range(40)) for _ in range(200)]
    directory = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(docs, "bpe", 320).save(directory)
    return directory


def make_checkpoint(directory: Path, tokenizer_dir: Path, fields: dict, extra_vocab: int = 0,
                    seed: int = 0) -> Path:
    """A tiny random model with non-trivial norms and biases (so layouts are really tested) and
    sharp attention (larger q/k weights, so the RoPE convention visibly matters), saved."""
    from acornlm.tokenizer import load_tokenizer

    config = ModelConfig(vocab_size=load_tokenizer(tokenizer_dir).vocab_size + extra_vocab, **fields)
    torch.manual_seed(seed)
    model = Transformer(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.add_(0.2 * torch.randn_like(param))
            elif name.endswith(("q_proj.weight", "k_proj.weight")):
                param.mul_(8.0)
    directory.mkdir(parents=True)
    write_model_files(directory, model, tokenizer_dir=tokenizer_dir)
    return directory


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tokenizer_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpts")
    return {name: make_checkpoint(root / name, tokenizer_dir, fields, extra)
            for name, (fields, extra) in VARIANTS.items()}


@pytest.fixture(scope="module")
def exported(tmp_path_factory, checkpoints):
    """(variant, type) -> path of the exported file, built on first use."""
    root = tmp_path_factory.mktemp("gguf")
    cache: dict[tuple[str, str], Path] = {}

    def get(variant: str, type: str) -> Path:
        if (variant, type) not in cache:
            cache[variant, type] = export_gguf(checkpoints[variant], root / f"{variant}-{type}.gguf", type=type)
        return cache[variant, type]
    return get


def field(reader, key: str):
    return reader.fields[key].contents() if key in reader.fields else None


def read_tensors(reader) -> dict[str, np.ndarray]:
    """Every tensor as float32 in numpy order ([out, in] for a matrix), dequantized."""
    return {t.name: gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(
        [int(n) for n in reversed(t.shape)]) for t in reader.tensors}


def load_acornlm(ckpt: Path):
    from acornlm.model.checkpoint import load_model
    return load_model(ckpt, dtype=torch.float32)[0]


def interleaved_to_rotate_half(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """The inverse of the export's row permutation: rows (2j, 2j+1) of a head back to (j, j + d/2)."""
    head_dim = weight.shape[0] // num_heads
    return weight.reshape(num_heads, head_dim // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


# --- metadata and tokenizer -------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["llama", "qwen3", "gpt2"])
def test_metadata_and_tokenizer_match_the_checkpoint(variant, exported, checkpoints, tokenizer_dir):
    from acornlm.tokenizer import load_tokenizer

    reader = gguf.GGUFReader(exported(variant, "f32"))
    config = load_acornlm(checkpoints[variant]).config
    arch = ARCH[variant]
    assert field(reader, "general.architecture") == arch
    assert field(reader, "general.file_type") == int(gguf.LlamaFileType.ALL_F32)
    assert field(reader, f"{arch}.context_length") == config.max_position_embeddings
    assert field(reader, f"{arch}.embedding_length") == config.hidden_size
    assert field(reader, f"{arch}.block_count") == config.num_hidden_layers
    assert field(reader, f"{arch}.feed_forward_length") == config.intermediate_size
    assert field(reader, f"{arch}.attention.head_count") == config.num_attention_heads
    assert field(reader, f"{arch}.attention.head_count_kv") == config.num_key_value_heads
    if arch == "gpt2":
        assert field(reader, "gpt2.attention.layer_norm_epsilon") == pytest.approx(config.norm_eps)
        assert field(reader, "gpt2.rope.freq_base") is None
    else:
        assert field(reader, f"{arch}.attention.layer_norm_rms_epsilon") == pytest.approx(config.norm_eps)
        assert field(reader, f"{arch}.rope.freq_base") == pytest.approx(config.rope_theta)
        assert field(reader, f"{arch}.rope.dimension_count") == config.head_dim
        assert field(reader, f"{arch}.attention.key_length") == config.head_dim
        assert field(reader, f"{arch}.attention.value_length") == config.head_dim

    tok = load_tokenizer(tokenizer_dir)
    tokens = field(reader, "tokenizer.ggml.tokens")
    types = field(reader, "tokenizer.ggml.token_type")
    assert field(reader, "tokenizer.ggml.model") == "gpt2"
    assert field(reader, "tokenizer.ggml.pre") == "gpt-2"
    assert len(tokens) == len(types) == config.vocab_size
    assert tokens[:tok.vocab_size] == [tok.id_to_token(i) for i in range(tok.vocab_size)]
    assert types[:3] == [gguf.TokenType.CONTROL] * 3  # <|endoftext|>, <|im_start|>, <|im_end|>
    chat = [tok.token_to_id(t) for t in CHAT_TOKENS]  # <think>, <tool_call>, ...: text llama.cpp keeps
    assert chat == list(range(tok.vocab_size - len(CHAT_TOKENS), tok.vocab_size))
    assert set(types[3:chat[0]]) == {gguf.TokenType.NORMAL}
    assert types[chat[0]:tok.vocab_size] == [gguf.TokenType.USER_DEFINED] * len(CHAT_TOKENS)
    padding = range(tok.vocab_size, config.vocab_size)
    assert tokens[tok.vocab_size:] == [f"[PAD{i}]" for i in padding]
    assert types[tok.vocab_size:] == [gguf.TokenType.UNUSED] * len(padding)
    spec = json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    assert field(reader, "tokenizer.ggml.merges") == [" ".join(m) if isinstance(m, list) else m
                                                      for m in spec["model"]["merges"]]
    keys = gguf.Keys.Tokenizer
    for key in (keys.BOS_ID, keys.EOS_ID, keys.PAD_ID):
        assert field(reader, key) == tok.token_to_id("<|endoftext|>")
    assert field(reader, keys.UNK_ID) is None  # byte-level BPE has no unknowns
    assert field(reader, keys.ADD_BOS) is False
    template = json.loads((tokenizer_dir / "tokenizer_config.json").read_text(encoding="utf-8"))["chat_template"]
    assert field(reader, "tokenizer.chat_template") == template == CHAT_TEMPLATE  # with tools and thinking


# --- tensors ----------------------------------------------------------------------------------------

def expected_tensors(variant: str, model: Transformer) -> dict[str, np.ndarray]:
    """The checkpoint's weights under llama.cpp names, in the checkpoint's own (rotate_half) layout."""
    c = model.config
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    out = {"token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"]}
    if not c.tie_word_embeddings:
        out["output.weight"] = sd["lm_head.weight"]
    gpt2 = ARCH[variant] == "gpt2"
    if gpt2:
        out["position_embd.weight"] = sd["model.embed_positions.weight"]
        out["output_norm.bias"] = sd.get("model.norm.bias", np.zeros(c.hidden_size, np.float32))
    names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate",
             "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for key, value in sd.items():
        if not key.startswith("model.layers."):
            continue
        layer, rest = key[len("model.layers."):].split(".", 1)
        module, kind = rest.rsplit(".", 1)
        out[f"blk.{layer}.{names[module]}.{kind}"] = value
    if gpt2:  # fused QKV, and zero biases where the model has none
        for i in range(c.num_hidden_layers):
            b = f"blk.{i}."
            zeros = {b + "attn_norm.bias": c.hidden_size, b + "ffn_norm.bias": c.hidden_size,
                     b + "attn_output.bias": c.hidden_size, b + "ffn_down.bias": c.hidden_size,
                     b + "ffn_up.bias": c.intermediate_size, b + "attn_q.bias": c.hidden_size,
                     b + "attn_k.bias": c.num_key_value_heads * c.head_dim,
                     b + "attn_v.bias": c.num_key_value_heads * c.head_dim}
            for name, size in zeros.items():
                out.setdefault(name, np.zeros(size, np.float32))
            for kind in ("weight", "bias"):
                out[f"{b}attn_qkv.{kind}"] = np.concatenate([out.pop(f"{b}attn_{p}.{kind}") for p in "qkv"])
    return out


@pytest.mark.parametrize("type", ["f32", "f16", "q8_0"])
@pytest.mark.parametrize("variant", ["llama", "qwen3", "gpt2"])
def test_every_tensor_equals_the_checkpoint(variant, type, exported, checkpoints):
    model = load_acornlm(checkpoints[variant])
    reader = gguf.GGUFReader(exported(variant, type))
    got = read_tensors(reader)
    want = expected_tensors(variant, model)
    assert sorted(got) == sorted(want)
    if ARCH[variant] == "llama":  # llama.cpp's llama rotates adjacent pairs: undo the row permutation
        c = model.config
        for name in list(got):
            if name.endswith(("attn_q.weight", "attn_q.bias")):
                got[name] = interleaved_to_rotate_half(got[name], c.num_attention_heads)
            elif name.endswith(("attn_k.weight", "attn_k.bias")):
                got[name] = interleaved_to_rotate_half(got[name], c.num_key_value_heads)
    qtype = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
             "q8_0": gguf.GGMLQuantizationType.Q8_0}[type]
    for t in reader.tensors:
        name, expected = t.name, want[t.name]
        assert got[name].shape == expected.shape, name
        matrix = expected.ndim == 2 and name != "position_embd.weight"
        assert t.tensor_type == (qtype if matrix else gguf.GGMLQuantizationType.F32), name
        if not matrix or type == "f32":
            np.testing.assert_array_equal(got[name], expected, err_msg=name)
        elif type == "f16":
            np.testing.assert_array_equal(got[name], expected.astype(np.float16).astype(np.float32), err_msg=name)
        else:  # q8_0: each block of 32 is rounded to a multiple of max|block| / 127
            blocks = np.abs(expected).reshape(-1, 32).max(axis=1, keepdims=True)
            error = np.abs(got[name] - expected).reshape(-1, 32)
            assert (error <= blocks / 127 * 0.5 + blocks * 1e-3 + 1e-7).all(), name
            assert not np.array_equal(got[name], expected)  # really quantized


# --- llama.cpp semantics ---------------------------------------------------------------------------

def rope(x: np.ndarray, theta: float, interleaved: bool) -> np.ndarray:
    """RoPE on x [T, heads, D]: rotate (2j, 2j+1) pairs (llama.cpp NORM) or (j, j + D/2) pairs (NEOX)."""
    seq, _, dim = x.shape
    angles = np.arange(seq)[:, None] * theta ** (-np.arange(0, dim, 2) / dim)[None, :]  # [T, D/2]
    cos, sin = np.cos(angles)[:, None, :], np.sin(angles)[:, None, :]
    a, b = (x[..., 0::2], x[..., 1::2]) if interleaved else (x[..., :dim // 2], x[..., dim // 2:])
    ra, rb = a * cos - b * sin, a * sin + b * cos
    out = np.empty_like(x)
    if interleaved:
        out[..., 0::2], out[..., 1::2] = ra, rb
    else:
        out[..., :dim // 2], out[..., dim // 2:] = ra, rb
    return out


def reference_logits(path: Path, ids: list[int], rope_interleaved: bool | None = None) -> np.ndarray:
    """Logits of the GGUF model computed the way llama.cpp's llama/qwen3/gpt2 graphs compute them."""
    reader = gguf.GGUFReader(path)
    w = {k: v.astype(np.float64) for k, v in read_tensors(reader).items()}
    arch = field(reader, "general.architecture")
    get = lambda key: field(reader, f"{arch}.{key}")  # noqa: E731
    n_head, n_kv, layers = get("attention.head_count"), get("attention.head_count_kv"), get("block_count")
    head_dim = get("attention.key_length") or get("embedding_length") // n_head
    if rope_interleaved is None:
        rope_interleaved = arch == "llama"  # llama.cpp: LLAMA_ROPE_TYPE_NORM; qwen3: NEOX; gpt2: none
    eps = get("attention.layer_norm_epsilon") if arch == "gpt2" else get("attention.layer_norm_rms_epsilon")

    def norm(x, name):
        if arch == "gpt2":
            x = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps)
            return x * w[name + ".weight"] + w[name + ".bias"]
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w[name + ".weight"]

    def linear(x, name):
        return x @ w[name + ".weight"].T + w.get(name + ".bias", 0.0)

    seq = len(ids)
    x = w["token_embd.weight"][ids]
    if arch == "gpt2":
        x = x + w["position_embd.weight"][:seq]
    for i in range(layers):
        b = f"blk.{i}."
        h = norm(x, b + "attn_norm")
        if arch == "gpt2":
            q, k, v = np.split(linear(h, b + "attn_qkv"), [n_head * head_dim, (n_head + n_kv) * head_dim], axis=-1)
        else:
            q, k, v = linear(h, b + "attn_q"), linear(h, b + "attn_k"), linear(h, b + "attn_v")
        q, k, v = q.reshape(seq, n_head, head_dim), k.reshape(seq, n_kv, head_dim), v.reshape(seq, n_kv, head_dim)
        if arch == "qwen3":
            q = q / np.sqrt((q * q).mean(-1, keepdims=True) + eps) * w[b + "attn_q_norm.weight"]
            k = k / np.sqrt((k * k).mean(-1, keepdims=True) + eps) * w[b + "attn_k_norm.weight"]
        if arch != "gpt2":
            theta = get("rope.freq_base")
            q, k = rope(q, theta, rope_interleaved), rope(k, theta, rope_interleaved)
        k, v = np.repeat(k, n_head // n_kv, axis=1), np.repeat(v, n_head // n_kv, axis=1)
        scores = np.einsum("thd,shd->hts", q, k) / np.sqrt(head_dim)
        scores = np.where(np.tril(np.ones((seq, seq), bool)), scores, -np.inf)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        x = x + linear(np.einsum("hts,shd->thd", probs, v).reshape(seq, -1), b + "attn_output")
        h = norm(x, b + "ffn_norm")
        if arch == "gpt2":
            up = linear(h, b + "ffn_up")
            act = 0.5 * up * (1 + np.tanh(np.sqrt(2 / np.pi) * (up + 0.044715 * up ** 3)))
        else:
            gate = linear(h, b + "ffn_gate")
            act = gate / (1 + np.exp(-gate)) * linear(h, b + "ffn_up")
        x = x + linear(act, b + "ffn_down")
    x = norm(x, "output_norm")
    return x @ w.get("output.weight", w["token_embd.weight"]).T


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_llama_cpp_graph_on_the_file_gives_acornlm_logits(variant, exported, checkpoints):
    model = load_acornlm(checkpoints[variant])
    ids = [int(i) for i in torch.randint(0, model.config.vocab_size, (20,), generator=torch.Generator().manual_seed(3))]
    with torch.no_grad():
        want = model(torch.tensor([ids]))[0].double().numpy()
    path = exported(variant, "f32")
    error = np.abs(reference_logits(path, ids) - want).max()
    assert error <= 1e-4
    if ARCH[variant] != "gpt2":  # the RoPE convention matters: the other one is far off
        wrong = reference_logits(path, ids, rope_interleaved=ARCH[variant] != "llama")
        assert np.abs(wrong - want).max() > 100 * max(error, 1e-6)


# --- refusals and file handling ---------------------------------------------------------------------

def test_existing_output_needs_force_and_is_replaced_whole(tmp_path, checkpoints):
    out = tmp_path / "model.gguf"
    out.write_bytes(b"precious")
    with pytest.raises(ConfigError, match="--force"):
        export_gguf(checkpoints["llama"], out)
    assert out.read_bytes() == b"precious"
    assert export_gguf(checkpoints["llama"], out, force=True) == out
    assert field(gguf.GGUFReader(out), "general.architecture") == "llama"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]  # no temporary file left behind


def test_output_directory_and_unknown_type_are_refused(tmp_path, checkpoints):
    with pytest.raises(ConfigError, match="is a directory"):
        export_gguf(checkpoints["llama"], tmp_path, force=True)
    with pytest.raises(ConfigError, match="f32, f16, q8_0"):
        export_gguf(checkpoints["llama"], tmp_path / "m.gguf", type="q4_k")
    assert list(tmp_path.iterdir()) == []


def assert_refused(ckpt: Path, out_dir: Path, match: str, type: str = "f16") -> None:
    out_dir.mkdir(exist_ok=True)
    with pytest.raises(ConfigError, match=match):
        export_gguf(ckpt, out_dir / "m.gguf", type=type)
    assert list(out_dir.iterdir()) == []  # nothing written, not even a temporary file


def test_q8_0_refuses_rows_that_are_not_whole_blocks(tmp_path, tokenizer_dir):
    # hidden_size 48: every matrix row that reads the residual stream has 48 values, not a multiple of 32
    ckpt = make_checkpoint(tmp_path / "ck", tokenizer_dir, dict(BASE, hidden_size=48, intermediate_size=64))
    assert_refused(ckpt, tmp_path / "out", r"q8_0 cannot store tensor token_embd\.weight of shape \[\d+, 48\]",
                   type="q8_0")
    assert export_gguf(ckpt, tmp_path / "out" / "m.gguf", type="f16").is_file()  # f16 is fine


def test_f16_refuses_weights_beyond_its_range(tmp_path, tokenizer_dir):
    ckpt = make_checkpoint(tmp_path / "ck", tokenizer_dir, BASE)
    from safetensors.torch import load_file, save_file
    state = load_file(str(ckpt / "model.safetensors"))
    state["model.layers.1.mlp.up_proj.weight"][0, 0] = 1e6
    save_file(state, str(ckpt / "model.safetensors"))
    assert_refused(ckpt, tmp_path / "out", r"blk\.1\.ffn_up\.weight.*--type f32")


def test_char_tokenizer_is_refused(tmp_path):
    char_dir = tmp_path / "char-tok"
    train_tokenizer(["hello world, the king sings"], "char", 64).save(char_dir)
    ckpt = make_checkpoint(tmp_path / "ck", char_dir, BASE)
    assert_refused(ckpt, tmp_path / "out", "char-level")


@pytest.mark.parametrize("fields, match", [
    (dict(BASE, norm="layernorm"), "norm=rmsnorm and mlp=swiglu"),
    (dict(BASE, qk_norm=True, attention_bias=True), "`qwen3` has no biases"),
    (dict(GPT2, norm="rmsnorm"), "`gpt2` needs norm=layernorm"),
    (dict(GPT2, head_dim=32), r"num_attention_heads \* head_dim == hidden_size"),
])
def test_architectures_llama_cpp_cannot_represent_are_refused(tmp_path, tokenizer_dir, fields, match):
    ckpt = make_checkpoint(tmp_path / "ck", tokenizer_dir, fields)
    assert_refused(ckpt, tmp_path / "out", match)
