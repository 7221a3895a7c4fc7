"""The run planner (`acornlm plan`, `train pretrain --dry-run`): exact parameter and FLOP counts,
activation bytes equal to what autograd really saves, the memory model's invariants, advice when a
model does not fit, and the CLI. The plan-versus-measured peaks are benchmarks/plan_vs_measured.py's."""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import gc
import json
import os
import sys

import pytest
import torch

from acornlm.accel import accelerate
from acornlm.cli import main
from acornlm.errors import ConfigError
from acornlm.model import ModelConfig, Transformer
from acornlm.presets import load_preset
from acornlm.train import devices
from acornlm.train import plan as P
from acornlm.train.config import TrainConfig
from acornlm.train.devices import DeviceSpec, GiB, device_spec, gpu_spec_for
from acornlm.train.losses import next_token_loss
from acornlm.train.muon import split_parameters

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = DeviceSpec("cpu", 64 * GiB, 1e11, 0.0, kind="cpu")  # a CPU without measuring this one's matmul peak
GPU24 = device_spec("cuda:24GB")
SMALL = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)
VARIANTS = {
    "llama-gqa": {},
    "untied-bias": dict(tie_word_embeddings=False, attention_bias=True, mlp_bias=True),
    "gpt2": dict(norm="layernorm", mlp="gelu", position="learned", attention_bias=True, mlp_bias=True),
    "qwen3-qknorm": dict(qk_norm=True, head_dim=16),
    "moe-shared": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, num_shared_experts=1),
    "moe-untied": dict(num_experts=3, num_experts_per_tok=1, tie_word_embeddings=False),
}


def preset_model(name: str, vocab: int = 300) -> ModelConfig:
    fields = dict(load_preset(name)["model"])
    fields["vocab_size"] = fields["vocab_size"] or vocab
    return ModelConfig(**fields)


@pytest.mark.parametrize("preset", ["tiny", "minimind2-small", "minimind2-moe", "minimind3", "gpt2-124m",
                                    "qwen3-tiny", "nanogpt-shakespeare-char"])
def test_params_and_flops_equal_the_built_model(preset):
    config = preset_model(preset)
    with torch.device("meta"):
        model = Transformer(config)
    counts = P.count_params(config)
    assert counts.total == model.num_params()
    assert counts.active == model.active_params()
    assert P.flops_per_token(config, 256) == model.flops_per_token(256)
    assert counts.muon == sum(p.numel() for _, p in split_parameters(model)[0])
    assert counts.total == counts.root + config.num_hidden_layers * counts.per_block


@pytest.mark.parametrize("variant", VARIANTS)
def test_params_of_variants_equal_the_built_model(variant):
    config = ModelConfig(**(SMALL | VARIANTS[variant]))
    model = Transformer(config)
    counts = P.count_params(config)
    assert (counts.total, counts.active) == (model.num_params(), model.active_params())
    assert counts.muon == sum(p.numel() for _, p in split_parameters(model)[0])
    assert P.flops_per_token(config, 40) == model.flops_per_token(40)


def saved_activation_bytes(model: Transformer, batch: int, seq: int, autocast: bool) -> int:
    """Bytes of the distinct tensors autograd saves in one training forward (weights and buffers excluded)."""
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in own:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    ids = torch.randint(0, model.config.vocab_size, (batch, seq + 1), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            next_token_loss(model, (ids[:, :-1], ids[:, 1:]))
    return sum(saved.values())


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")  # torch: QK-norm's unfused rms_norm
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_activation_bytes_equal_what_autograd_saves(variant, autocast):
    """The per-token formulas of block_activation_bytes / root_activation_bytes, summed over the
    layers, equal the bytes of the tensors torch keeps for backward (to within a few bytes: the loss
    scalar, the id tensor's extra column, learned positions' [T] ids); under autocast, plus the 16-bit
    weight copies."""
    config = ModelConfig(**(SMALL | VARIANTS[variant]))
    torch.manual_seed(0)
    model = accelerate(Transformer(config), "cpu", mode="train")
    batch, seq = 2, 24
    measured = saved_activation_bytes(model, batch, seq, autocast)
    per_token = (P.block_activation_bytes(config, seq, autocast, False) * config.num_hidden_layers
                 + P.root_activation_bytes(config, autocast))
    predicted = per_token * batch * seq + (2 * P.count_params(config).multiplied if autocast else 0)
    tolerance = 0.05 if variant.startswith("moe") and autocast else 0.0  # the experts' casts: approximate
    assert abs(predicted - measured) <= 64 + 8 * seq + tolerance * measured


def test_cpu_attention_kernel_probabilities_are_counted():
    """Where CPU training takes the oneDNN attention (seq x group >= 1024 rows), the [B, heads, T, T]
    probabilities are kept, and the plan counts them."""
    config = preset_model("minimind2-small", vocab=64)
    config = dataclasses.replace(config, num_hidden_layers=1)
    assert P.uses_cpu_attention_kernel(config, 1, 256, on_cpu=True, low_precision=False)
    model = accelerate(Transformer(config), "cpu", mode="train")
    measured = saved_activation_bytes(model, 1, 256, autocast=False)
    predicted = (P.block_activation_bytes(config, 256, False, True) + P.root_activation_bytes(config, False)) * 256
    assert abs(predicted - measured) <= 64 + 8 * 256  # (ids and targets share one storage here)


def train_config(**overrides) -> TrainConfig:
    return TrainConfig(**({"batch_size": 8, "seq_len": 256} | overrides))


def test_breakdown_adds_up_and_ac_modes_order():
    config = preset_model("minimind2-small")
    for device in (CPU, GPU24):
        plans = {mode: P.plan_memory(config, train_config(), device, checkpointing=mode) for mode in ("none", "selective", "full")}
        for plan in plans.values():
            assert plan.total == sum(plan.breakdown().values())
        assert plans["none"].activations > plans["selective"].activations > plans["full"].activations
        assert plans["none"].weights == plans["full"].weights


def test_fsdp_shards_weights_gradients_and_optimizer_over_the_world():
    config = preset_model("gpt2-124m")
    train = train_config(parallel="fsdp")
    single = P.plan_memory(config, train, GPU24, 1)
    rope = P.rope_table_bytes(config)
    totals = []
    for world in (2, 4, 8):
        plan = P.plan_memory(config, train, GPU24, world)
        assert plan.detail["gradients_all"] == -(-single.detail["gradients_all"] // world)
        assert plan.optimizer == -(-single.optimizer // world)
        assert plan.weights - rope == -(-(single.weights - rope) // world)
        counts = P.count_params(config)
        assert plan.detail["fsdp_unsharded_params"] == 2 * (2 * counts.per_block + counts.root)  # bf16 on a GPU
        totals.append(plan.total)
    assert totals == sorted(totals, reverse=True)
    ddp = P.plan_memory(config, train_config(parallel="ddp"), GPU24, 8)
    assert ddp.detail["ddp_buckets"] == single.detail["gradients_all"]  # DDP's all-reduce buckets: a second copy
    assert ddp.gradients == single.gradients + ddp.detail["ddp_buckets"]
    offloaded = P.plan_memory(config, train_config(parallel="fsdp", fsdp_cpu_offload=True), GPU24, 8)
    assert offloaded.gradients == offloaded.optimizer == 0 and offloaded.host > 0


def test_gradients_at_the_peak_depend_on_accumulation():
    """Without accumulation the gradients appear during the backward pass as the activations are freed;
    with it, the previous micro-batches' gradients are there from the start."""
    config = preset_model("minimind2-small")
    one = P.plan_memory(config, train_config(), CPU)
    accumulating = P.plan_memory(config, train_config(grad_accum_steps=4), CPU)
    assert one.gradients < one.detail["gradients_all"] == accumulating.gradients
    assert one.total < accumulating.total <= one.total + one.detail["gradients_all"]
    assert one.activations <= one.detail["activations_all"]


def test_muon_keeps_one_buffer_for_its_matrices():
    config = preset_model("minimind2-small")
    counts = P.count_params(config)
    adamw = P.plan_memory(config, train_config(), CPU).optimizer
    muon = P.plan_memory(config, train_config(optimizer="muon"), CPU).optimizer
    assert adamw - muon == 4 * counts.muon


@pytest.mark.parametrize("mode", ["none", "full"])
def test_largest_micro_batch_fits_and_one_more_does_not(mode):
    config = preset_model("minimind2-small", vocab=6400)
    train = train_config(seq_len=512)
    largest = P.largest_micro_batch(config, train, GPU24, checkpointing=mode)
    assert largest > 1
    fits = P.plan_memory(config, train, GPU24, batch_size=largest, checkpointing=mode).total
    over = P.plan_memory(config, train, GPU24, batch_size=largest + 1, checkpointing=mode).total
    assert fits <= P.usable_bytes(GPU24) < over
    batch, accum = P.accumulation_for(640, largest, 1)  # the global batch kept with micro-batches that fit
    assert batch <= largest and batch * accum == 640
    batch, accum = P.accumulation_for(96, 40, 2)
    assert (batch, accum) == (24, 2) and batch * accum * 2 == 96
    with pytest.raises(ConfigError, match="does not split over 4 ranks"):
        P.accumulation_for(6, 8, 4)


def test_a_model_that_cannot_fit_says_by_how_much_and_what_would():
    config = preset_model("gpt2-124m", vocab=50257)
    small = dataclasses.replace(GPU24, name="cuda:2GB", memory_bytes=2 * GiB)
    run = P.plan_run(config, train_config(batch_size=8, seq_len=256), small)
    data = run.to_json()
    assert not data["fits"] and data["largest_micro_batch"] == 0
    advice = "\n".join(data["advice"])
    single = P.plan_memory(config, run.train, small, batch_size=1).total
    assert f"{P.format_bytes(single)} even at batch_size 1: {P.format_bytes(single - P.usable_bytes(small))} more " \
           "than the 1.90 GiB usable on cuda:2GB" in advice
    assert "FSDP over" in advice and "smaller presets that fit" in advice and "qwen3-tiny" in advice
    ranks = P.fsdp_ranks_needed(config, run.train, small, "full")
    assert ranks >= 2 and P.largest_micro_batch(config, run.train, small, ranks, parallel="fsdp",
                                                checkpointing="full") >= 1
    assert "DOES NOT FIT" in P.format_plan(run)


def test_plan_json_from_the_cli(capsys):
    main(["plan", "--config", "minimind2-small", "--device", "cuda:24GB", "--json"])
    data = json.loads(capsys.readouterr().out)
    for key in ("params", "peak_memory_bytes", "tokens_per_s", "memory_breakdown", "largest_micro_batch",
                "suggested_grad_accum_steps", "time_s", "cost", "options", "flops_per_token"):
        assert key in data
    assert data["params"] == P.count_params(preset_model("minimind2-small")).total
    assert data["peak_memory_bytes"] == sum(data["memory_breakdown"].values())
    assert len(data["options"]) == 6 and sum(o["chosen"] for o in data["options"]) == 1


def test_plan_table_node_and_vocab_note(capsys):
    main(["plan", "--config", "tiny", "--device", "8xH100", "--train.parallel", "fsdp"])
    out = capsys.readouterr().out
    assert "8xH100-SXM, 8 rank(s)" in out and "* fsdp      none" in out
    assert "assumed 6,400 tokens" in out


def test_dry_run_prints_the_plan_and_writes_nothing(prepared_data, tmp_path, capsys):
    out = tmp_path / "run"
    main(["train", "pretrain", "--config", "tiny", "--data", str(prepared_data), "--out", str(out),
          "--train.device", "cpu", "--dry-run"])
    printed = capsys.readouterr().out
    assert "peak memory per rank" in printed and "300 tokens (the tokenizer of" in printed
    assert not out.exists()


def test_unknown_device_is_a_one_line_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["plan", "--config", "tiny", "--device", "tpu-v9"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "unknown device 'tpu-v9'" in err and "H100-SXM" in err


def test_gpu_names_map_to_the_table():
    expected = {"NVIDIA H100 80GB HBM3": "H100-SXM", "NVIDIA H100 PCIe": "H100-PCIe",
                "NVIDIA A100-SXM4-40GB": "A100-40GB", "NVIDIA A100 80GB PCIe": "A100-80GB",
                "NVIDIA GeForce RTX 4090": "RTX4090", "NVIDIA GeForce RTX 3090": "RTX3090",
                "NVIDIA L4": "L4", "NVIDIA L40S": "L40S", "NVIDIA A10G": "A10G", "NVIDIA H200": "H200"}
    for name, spec in expected.items():
        assert gpu_spec_for(name).name == spec
    assert gpu_spec_for("Tesla T4") is None
    node = device_spec("8xH100")
    assert (node.count, node.bf16_flops, node.memory_bytes) == (8, 989e12, 80 * GiB)
    assert device_spec("cuda:24GB").memory_bytes == 24 * GiB


class MallocInfo(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]


def glibc_in_use():
    """Bytes glibc's malloc has handed out and not freed (heap + mmapped blocks), or None off glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        info_of = libc.mallinfo2
    except (OSError, AttributeError):
        return None
    info_of.restype = MallocInfo
    return lambda: info_of().uordblks + info_of().hblkhd


@pytest.mark.parametrize("mode", ["none", "full"])
def test_planned_peak_matches_the_measured_live_peak(mode):
    """Three real training steps (forward, backward, clipping, fused AdamW) of a small model: the most
    tensor bytes alive at once, read after every aten op, is within 15% of the plan (the benchmark's
    larger configurations are within 5%)."""
    in_use = glibc_in_use()
    if in_use is None:
        pytest.skip("needs glibc's mallinfo2 to read the allocator's live bytes")
    from torch.utils._python_dispatch import TorchDispatchMode

    from acornlm.train.activation_checkpointing import apply_activation_checkpointing
    from acornlm.train.optim import build_optimizer

    config = ModelConfig(vocab_size=512, hidden_size=128, intermediate_size=384, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    train = train_config(batch_size=8, seq_len=128, activation_checkpointing=mode)
    ids = torch.randint(0, 512, (8, 129), generator=torch.Generator().manual_seed(0))

    def build():
        torch.manual_seed(0)
        model = apply_activation_checkpointing(accelerate(Transformer(config), "cpu", mode="train"), mode)
        return model, build_optimizer(model, train, torch.device("cpu"))

    def step(model, optimizer):
        next_token_loss(model, (ids[:, :-1], ids[:, 1:])).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(*build())  # warm up: kernels' one-time caches are not the run's memory
    gc.collect()
    start = in_use()
    model, optimizer = build()
    peak = 0

    class Peak(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            nonlocal peak
            out = func(*args, **(kwargs or {}))
            peak = max(peak, in_use() - start)
            return out

    with Peak():
        for _ in range(3):
            step(model, optimizer)
    planned = P.plan_memory(config, train, CPU).total
    assert abs(planned / peak - 1) <= 0.15, (planned, peak)


def test_this_cpu_is_planned_without_psutil_and_a_missing_memory_size_is_one_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "psutil", None)  # `import psutil` would fail: it is not a dependency
    spec = devices.device_spec("cpu")
    assert spec.kind == "cpu" and spec.memory_bytes == os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")

    def no_sysconf(name):
        raise ValueError(name)

    monkeypatch.setattr(devices.os, "sysconf", no_sysconf)
    with pytest.raises(ConfigError, match="cannot read this machine's memory size; name the device"):
        devices.physical_memory_bytes()
