"""Serving throughput: aggregate decode tokens/s and latency at 1, 4, 16 and 64 concurrent streams.

    .venv/bin/python benchmarks/serve_throughput.py [--quick] [--ckpt DIR] [--preset minimind2-small]

The server runs in its own process exactly as `acornlm serve` does; this process is the client: N
streams at once, each a streaming /v1/chat/completions request for a fixed number of tokens
(`ignore_eos`, so every stream generates the same amount). Two server variants are started side by
side and measured in turns, level by level, for --repeats rounds (so load from elsewhere hits both):

    process   the engine in a process of its own (`acornlm serve`'s default)
    thread    the engine on a thread of the server process (`acornlm serve --engine_process false`)

Per variant and concurrency level, the round with the median tokens_per_s is reported:

    tokens_per_s      all streams' completion tokens / wall time from the first request to the last [DONE]
    decode_tokens_per_s  the sum over streams of (tokens after the first) / (first token -> [DONE]): the
                      rate while the streams decode together, without the prompts' prefill before it
    ttft_s            time to first token (request sent -> first content chunk), p50 / p95 over streams
    itl_s             inter-token latency (gap between consecutive content chunks), p50 / p95 over all gaps
    speedup_vs_1      tokens_per_s / tokens_per_s at 1 stream (continuous batching's gain)
    client_cpu_s      CPU time this client process spent on the level (it shares the machine's cores)
    decode_speedup_vs_1  the same for decode_tokens_per_s

`engine_levels` then runs the same streams (same prompt, sampling and token counts) through the
engine alone, in this process after the server has stopped: no HTTP, no client on the same cores.
The difference between the two is what the server and the client cost.

Without --ckpt the model is the preset's shape with random weights (speed does not depend on the
weights). Prints one JSON object; never asserts a time.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import multiprocessing
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, preset_config  # noqa: E402

from acornlm.model import Transformer  # noqa: E402
from acornlm.model.checkpoint import write_model_files  # noqa: E402
from acornlm.serve.engine_process import EngineSettings  # noqa: E402
from acornlm.tokenizer import train_tokenizer  # noqa: E402

WORDS = ("the king queen castle river stone green light dark sword song night morning bread friend enemy "
         "walks speaks sleeps sings finds keeps under over near with from and but").split()


def random_checkpoint(preset: str, out: Path) -> Path:
    """A checkpoint of the preset's shape with random weights and a BPE tokenizer of generated text
    with the preset's full vocabulary, so sampling works over as many tokens as a trained model's.
    (The text is a few thousand made-up words: enough distinct pairs for 6,400 BPE tokens in ~1 s.)"""
    import random
    import string

    rng = random.Random(0)
    config = preset_config(preset)
    made_up = ["".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 9))) for _ in range(4000)]
    texts = [" ".join(rng.choice(WORDS + made_up) for _ in range(200)) for _ in range(1000)]
    tokenizer = train_tokenizer(texts, "bpe", config.vocab_size or 300)
    tokenizer.save(out / "tokenizer")
    if not config.vocab_size:  # 0 = the tokenizer's size
        config = dataclasses.replace(config, vocab_size=tokenizer.vocab_size)
    torch.manual_seed(0)
    model = Transformer(config).eval()
    ckpt = out / "ckpt"
    ckpt.mkdir()
    write_model_files(ckpt, model, {"note": "random weights for benchmarking"}, tokenizer_dir=out / "tokenizer")
    return ckpt


def serve_process(settings, port: int, variant: str) -> None:
    """The server, as `acornlm serve` runs it (in a child process); `settings` is an EngineSettings."""
    from acornlm.serve.engine_process import EngineProcess
    from acornlm.serve.protocol import ServerLimits
    from acornlm.serve.server import run_server

    engine = EngineProcess(settings) if variant == "process" else settings.load()
    run_server(engine, "bench", host="127.0.0.1", port=port, limits=ServerLimits(max_output_tokens=4096),
               log_level="warning")  # no access log: stdout carries the JSON


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def one_stream(client: httpx.AsyncClient, url: str, seed: int, max_tokens: int, prompt: str) -> dict:
    body = {"model": "bench", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0.8, "seed": seed, "stream": True, "stream_options": {"include_usage": True},
            "ignore_eos": True}
    start = time.perf_counter()
    chunk_times: list[float] = []
    tokens = 0
    async with client.stream("POST", url, json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            if data.get("usage"):
                tokens = data["usage"]["completion_tokens"]
            if data["choices"] and data["choices"][0]["delta"].get("content"):
                chunk_times.append(time.perf_counter())
    end = time.perf_counter()
    gaps = [b - a for a, b in zip(chunk_times, chunk_times[1:])]
    return {"start": start, "end": end, "ttft": (chunk_times[0] - start) if chunk_times else None, "gaps": gaps,
            "first_token": chunk_times[0] if chunk_times else None, "tokens": tokens}


async def run_level(base_url: str, concurrency: int, max_tokens: int, prompt: str) -> dict:
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        await one_stream(client, base_url + "/v1/chat/completions", 12345, 4, prompt)  # warm-up
        streams = await asyncio.gather(*(one_stream(client, base_url + "/v1/chat/completions", seed, max_tokens,
                                                    prompt) for seed in range(concurrency)))
    wall = max(s["end"] for s in streams) - min(s["start"] for s in streams)
    tokens = sum(s["tokens"] for s in streams)
    ttfts = [s["ttft"] for s in streams if s["ttft"] is not None]
    gaps = [g for s in streams for g in s["gaps"]]
    decode_rate = sum((s["tokens"] - 1) / (s["end"] - s["first_token"]) for s in streams
                      if s["first_token"] is not None and s["tokens"] > 1)
    return {
        "concurrency": concurrency, "tokens": tokens, "wall_s": round(wall, 3),
        "tokens_per_s": round(tokens / wall, 1),
        "decode_tokens_per_s": round(decode_rate, 1),
        "ttft_s": {"p50": round(percentile(ttfts, 50), 4), "p95": round(percentile(ttfts, 95), 4)},
        "itl_s": {"p50": round(percentile(gaps, 50), 5), "p95": round(percentile(gaps, 95), 5)},
        "per_stream_tokens_per_s": round(statistics.median(s["tokens"] / (s["end"] - s["start"]) for s in streams), 1),
    }


def engine_level(engine, prompt_ids: list[int], concurrency: int, max_tokens: int) -> dict:
    """`concurrency` sequences through `engine.step()` directly, timed per token as the server streams them."""
    from acornlm.infer.sampling import SamplingParams

    times: list[list[float]] = [[] for _ in range(concurrency)]
    start = time.perf_counter()
    for seed in range(concurrency):
        engine.submit(prompt_ids, SamplingParams(max_new_tokens=max_tokens, temperature=0.8, seed=seed),
                      on_event=lambda event, seed=seed: times[seed].append(time.perf_counter()), ignore_eos=True)
    while engine.step():
        pass
    tokens = sum(map(len, times))
    return {
        "concurrency": concurrency, "tokens": tokens,
        "tokens_per_s": round(tokens / (max(t[-1] for t in times) - start), 1),
        "decode_tokens_per_s": round(sum((len(t) - 1) / (t[-1] - t[0]) for t in times if len(t) > 1), 1),
    }


def engine_levels(settings, args: argparse.Namespace, prompt: str) -> list[dict]:
    from acornlm.data.chat import render_prompt

    engine = settings.load()  # in this process, with the server's settings
    prompt_ids = render_prompt(engine.tokenizer, [{"role": "user", "content": prompt}])
    engine_level(engine, prompt_ids, 1, 4)  # warm-up
    levels = [engine_level(engine, prompt_ids, c, args.max_tokens) for c in args.concurrency]
    add_speedups(levels)
    return levels


def median_round(levels: list[dict]) -> dict:
    """The round with the median tokens_per_s (the lower middle one for an even count)."""
    ordered = sorted(levels, key=lambda level: level["tokens_per_s"])
    chosen = dict(ordered[(len(ordered) - 1) // 2])
    chosen["tokens_per_s_rounds"] = [level["tokens_per_s"] for level in levels]
    return chosen


def add_speedups(levels: list[dict]) -> None:
    """speedup_vs_1 (tokens_per_s) and decode_speedup_vs_1 (decode_tokens_per_s) against 1 stream."""
    single = next((level for level in levels if level["concurrency"] == 1), None)
    for level in levels:
        for key, rate in (("speedup_vs_1", "tokens_per_s"), ("decode_speedup_vs_1", "decode_tokens_per_s")):
            level[key] = round(level[rate] / single[rate], 2) if single else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", help="checkpoint to serve (default: random weights of --preset)")
    parser.add_argument("--preset", default="minimind2-small")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--max-tokens", type=int, default=128, help="tokens generated per stream")
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--max-context", type=int, default=1024, help="KV cache positions per sequence")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch threads of the server (0 = default)")
    parser.add_argument("--variants", nargs="+", choices=["process", "thread"], default=["process", "thread"],
                        help="server variants measured side by side; `levels` reports the first")
    parser.add_argument("--repeats", type=int, default=3, help="rounds over the levels and variants")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: tiny preset, 16 tokens, 1 and 4 streams, one round")
    args = parser.parse_args()
    if args.quick:
        args.preset, args.max_tokens, args.concurrency, args.repeats = "tiny", 16, [1, 4], 1
    prompt = "the king speaks to the queen near the river and the castle " * 2

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.ckpt or str(random_checkpoint(args.preset, Path(tmp)))
        settings = EngineSettings(ckpt, device=args.device, dtype=args.dtype, max_batch=args.max_batch,
                                  max_queue=4 * args.max_batch, max_context=args.max_context, threads=args.threads)
        servers = {}
        try:
            for variant in args.variants:
                port = free_port()
                # not a daemon: the "process" variant starts the engine's own process
                server = multiprocessing.get_context("spawn").Process(
                    target=serve_process, args=(settings, port, variant))
                server.start()
                servers[variant] = (server, f"http://127.0.0.1:{port}")
            health = {variant: wait_for_server(url, server) for variant, (server, url) in servers.items()}
            rounds = {variant: {c: [] for c in args.concurrency} for variant in args.variants}
            for round_idx in range(args.repeats):
                for c in args.concurrency:
                    shift = round_idx % len(args.variants)
                    for variant in args.variants[shift:] + args.variants[:shift]:
                        cpu = time.process_time()
                        level = asyncio.run(run_level(servers[variant][1], c, args.max_tokens, prompt))
                        level["client_cpu_s"] = round(time.process_time() - cpu, 3)
                        rounds[variant][c].append(level)
        finally:
            for server, _ in servers.values():
                server.terminate()
                server.join(10)
        variants = {}
        for variant in args.variants:
            levels = [median_round(rounds[variant][c]) for c in args.concurrency]
            add_speedups(levels)
            variants[variant] = levels
        engine_only = engine_levels(settings, args, prompt)
    result = {
        "benchmark": "serve_throughput",
        "model": {"checkpoint": args.ckpt or f"random {args.preset}",
                  "context": health[args.variants[0]]["context_length"]},
        "server": {"max_batch": args.max_batch, "max_context": args.max_context, "device": args.device,
                   "dtype": args.dtype,
                   "threads": args.threads or "default"},
        "max_tokens_per_stream": args.max_tokens,
        "repeats": args.repeats,
        "levels": variants[args.variants[0]],
        "variants": variants,
        "engine_levels": engine_only,
        "environment": environment(),
    }
    print(json.dumps(result, indent=2))


def wait_for_server(base_url: str, server: multiprocessing.Process, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not server.is_alive():
            raise SystemExit("the server process died; run `acornlm serve` with the same checkpoint to see why")
        try:
            response = httpx.get(base_url + "/health", timeout=2)
            if response.status_code == 200:
                return response.json()
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit("the server did not come up in time")


if __name__ == "__main__":
    main()
