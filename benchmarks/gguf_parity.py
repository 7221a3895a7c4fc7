"""Parity of acornlm's GGUF export with llama.cpp itself, through llama-cpp-python.

For each model (by default a tiny llama, qwen3 and gpt2 model, trained here for a few hundred
steps on generated text so that greedy decoding is not a coin toss between near-equal logits):

  tokenization   llama.cpp's tokens for several strings (ASCII, spaces, Chinese, emoji, ChatML
                 special tokens) against acornlm's, and llama.cpp's detokenization of them
  logits         max abs difference of the logits of a prompt, every position, and how often the
                 top token agrees
  greedy         32 greedily decoded tokens after the prompt, llama.cpp vs acornlm

llama.cpp runs on the CPU with an f32 KV cache, so an f32 export should match to float rounding.
llama-cpp-python compiles llama.cpp when installed (about 10 minutes on 2 cores), so it is not a
dependency of acornlm; install it into any environment and point --llama-site at its
site-packages, or install it next to acornlm. Without it, the script says so and exits 0.

Usage:
  python benchmarks/gguf_parity.py [--type f32|f16|q8_0] [--steps 300]
  python benchmarks/gguf_parity.py --ckpt runs/demo --type f16
  python benchmarks/gguf_parity.py --llama-site /tmp/llvenv/lib/python3.11/site-packages
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from acornlm.export.gguf import export_gguf  # noqa: E402
from acornlm.model import ModelConfig, Transformer  # noqa: E402
from acornlm.model.checkpoint import load_model, resolve_checkpoint, write_model_files  # noqa: E402
from acornlm.tokenizer import load_tokenizer, train_tokenizer  # noqa: E402

STRINGS = [
    "Hello world",
    "The king's castle stood by the river, and it's 2024.",
    "  leading spaces,   runs of spaces  and a trailing one ",
    "tabs\tand\nnew lines\n\n\nend",
    "你好，世界！今天天气很好。",
    "emoji 🙂🚀 and mixed 中文 text",
    "<|im_start|>user\nWhat is 3.14?<|im_end|>\n<|im_start|>assistant\n",
]
PROMPT = "The king walks to the river and the queen"
GREEDY_TOKENS = 32

WORDS = ("the king queen castle river stone green light dark sword song night morning bread friend "
         "enemy walks speaks sleeps sings finds keeps under over near with from and but 你好 世界 🙂").split()
TINY = dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, rope_theta=10000.0, norm_eps=1e-5)
FAMILIES = {
    "llama": TINY,
    "qwen3": dict(TINY, qk_norm=True, rope_theta=1e6, norm_eps=1e-6),
    "gpt2": dict(TINY, intermediate_size=256, num_key_value_heads=4, norm="layernorm", mlp="gelu",
                 position="learned", attention_bias=True, mlp_bias=True),
    # mixture of experts: llama.cpp's qwen3moe renormalises the top-k weights, qwen2moe does not
    "qwen3moe": dict(TINY, qk_norm=True, rope_theta=1e6, norm_eps=1e-6, num_experts=4, num_experts_per_tok=2,
                     moe_intermediate_size=96),
    "qwen2moe": dict(TINY, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=96, num_shared_experts=1,
                     norm_topk_prob=False),
    # YaRN: trained at 128 positions but configured as extended x4 from 16, so the prompt and the
    # greedy continuation run on scaled frequencies past the original length
    "llama-yarn": dict(TINY, rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}),
}
DEFAULT_FAMILIES = ["llama", "qwen3", "gpt2"]


def import_llama_cpp(site: str | None):
    if site:
        sys.path.append(site)  # after acornlm's own packages, so numpy and torch stay ours
    try:
        import llama_cpp
    except ImportError:
        return None
    return llama_cpp


def generated_documents(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for _ in range(count):
        sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 10))).capitalize() + "."
                     for _ in range(rng.randint(3, 8))]
        docs.append(" ".join(sentences))
    return docs


def build_tiny_checkpoint(root: Path, family: str, steps: int, seed: int = 0) -> Path:
    """A tiny model of `family` trained for `steps` AdamW steps on generated text, saved as a checkpoint."""
    tokenizer_dir = root / "tokenizer"
    docs = generated_documents(400, seed=1)
    if not tokenizer_dir.exists():
        train_tokenizer(docs, "bpe", 400).save(tokenizer_dir)
    tokenizer = load_tokenizer(tokenizer_dir)
    ids = torch.tensor([t for doc in docs for t in [*tokenizer.encode(doc), tokenizer.eot_id]])
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(vocab_size=tokenizer.vocab_size, **FAMILIES[family]))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    seq, batch = 64, 16
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - seq - 1, (batch,), generator=generator)
        windows = torch.stack([ids[s:s + seq + 1] for s in starts.tolist()])
        logits = model(windows[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.eval()
    ckpt = root / family
    ckpt.mkdir(parents=True, exist_ok=True)
    write_model_files(ckpt, model, info={"name": f"acornlm-tiny-{family}", "final_loss": loss.item()},
                      tokenizer_dir=tokenizer_dir)
    return ckpt


def acornlm_greedy(model: Transformer, prompt: list[int], count: int) -> list[int]:
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(count):
            logits = model(torch.tensor([tokens]))[0, -1]
            tokens.append(int(logits.argmax()))
    return tokens[len(prompt):]


def llama_cpp_greedy(llm, prompt: list[int], count: int) -> list[int]:
    llm.reset()
    llm.eval(prompt)
    out = []
    for _ in range(count):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(token)
        llm.eval([token])
    return out


def compare(llama_cpp, ckpt: Path, gguf_type: str, workdir: Path) -> dict:
    """Export `ckpt` and compare llama.cpp's tokenization, logits and greedy decoding with acornlm's."""
    ckpt = resolve_checkpoint(ckpt)
    start = time.perf_counter()
    path = export_gguf(ckpt, workdir / f"{ckpt.name}-{gguf_type}.gguf", type=gguf_type, force=True)
    export_s = time.perf_counter() - start
    model, info = load_model(ckpt, dtype=torch.float32)
    tokenizer = load_tokenizer(ckpt)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=model.config.max_position_embeddings, logits_all=True,
                          n_threads=2, n_batch=512, type_k=0, type_v=0,  # GGML_TYPE_F32 KV cache
                          flash_attn=False, verbose=False)

    tokenization = []
    for text in STRINGS:
        ours = tokenizer.encode(text)
        theirs = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        back = llm.detokenize(ours, special=True).decode("utf-8", errors="replace")
        tokenization.append({"text": text, "match": ours == theirs, "detokenize_match": back == text,
                             **({} if ours == theirs else {"acornlm": ours, "llama_cpp": theirs})})

    prompt = tokenizer.encode(PROMPT)
    with torch.no_grad():
        ours = model(torch.tensor([prompt]))[0].numpy()
    llm.reset()
    llm.eval(prompt)
    theirs = np.array(llm.scores[:len(prompt)], dtype=np.float32)
    diff = np.abs(ours - theirs)

    greedy_ours = acornlm_greedy(model, prompt, GREEDY_TOKENS)
    greedy_theirs = llama_cpp_greedy(llm, prompt, GREEDY_TOKENS)
    first_mismatch = next((i for i, (a, b) in enumerate(zip(greedy_ours, greedy_theirs)) if a != b), None)
    return {
        "checkpoint": str(ckpt),
        "architecture": llm.metadata.get("general.architecture"),
        "type": gguf_type,
        "file_bytes": path.stat().st_size,
        "export_s": round(export_s, 3),
        "tokenization_all_match": all(t["match"] for t in tokenization),
        "detokenization_all_match": all(t["detokenize_match"] for t in tokenization),
        "tokenization": tokenization,
        "logits": {"prompt_tokens": len(prompt), "max_abs_diff": float(diff.max()),
                   "mean_abs_diff": float(diff.mean()), "logit_scale": float(np.abs(ours).max()),
                   "top1_agreement": float((ours.argmax(-1) == theirs.argmax(-1)).mean())},
        "greedy": {"identical": greedy_ours == greedy_theirs, "first_mismatch": first_mismatch,
                   "acornlm_text": tokenizer.decode(greedy_ours), "llama_cpp_text": tokenizer.decode(greedy_theirs)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", nargs="*", default=None, help="checkpoints to test (default: tiny trained models)")
    parser.add_argument("--families", nargs="*", default=DEFAULT_FAMILIES, choices=list(FAMILIES),
                        help="tiny models to build (also: qwen3moe, qwen2moe, llama-yarn)")
    parser.add_argument("--type", default="f32", choices=["f32", "f16", "q8_0"])
    parser.add_argument("--steps", type=int, default=300, help="training steps of each tiny model")
    parser.add_argument("--llama-site", default=None,
                        help="site-packages of an environment where llama-cpp-python is installed")
    args = parser.parse_args()

    llama_cpp = import_llama_cpp(args.llama_site)
    if llama_cpp is None:
        print(json.dumps({"llama_cpp": None, "skipped": "llama-cpp-python is not installed: pip install "
                          "llama-cpp-python (it compiles llama.cpp, about 10 minutes on 2 cores), or pass "
                          "--llama-site with the site-packages of an environment that has it"}, indent=2))
        return
    torch.set_num_threads(2)
    results = {"llama_cpp_python": llama_cpp.__version__, "torch": torch.__version__, "type": args.type,
               "models": []}
    with tempfile.TemporaryDirectory(prefix="gguf-parity-") as tmp:
        workdir = Path(tmp)
        ckpts = [Path(c) for c in args.ckpt] if args.ckpt else [
            build_tiny_checkpoint(workdir, family, args.steps) for family in args.families]
        for ckpt in ckpts:
            results["models"].append(compare(llama_cpp, ckpt, args.type, workdir))
    print(json.dumps(results, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
