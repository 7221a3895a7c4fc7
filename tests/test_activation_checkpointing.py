"""Activation checkpointing: the same loss and gradients as no checkpointing (bitwise), unchanged
state dicts, inference untouched, and a checkpointed CLI run that resumes exactly."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from acornlm.accel import accelerate
from acornlm.cli import main
from acornlm.errors import ConfigError
from acornlm.model import ModelConfig, Transformer
from acornlm.train import activation_checkpointing as ac
from acornlm.train.activation_checkpointing import apply_activation_checkpointing, checkpointed_blocks
from acornlm.train.checkpointing import LATEST_FILE, checkpoint_name, checkpoints_root

pytestmark = pytest.mark.usefixtures("one_thread")

MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, num_shared_experts=1)


def small_model(accelerated: bool, **overrides) -> Transformer:
    torch.manual_seed(0)
    fields = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=32, dropout=0.1)
    model = Transformer(ModelConfig(**(fields | overrides)))
    return accelerate(model, mode="train") if accelerated else model


def loss_and_gradients(model: Transformer, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One training forward/backward as the Trainer does it (dropout on, MoE aux loss added)."""
    torch.manual_seed(1)  # the same dropout masks in every run
    model.train()
    model.zero_grad(set_to_none=True)
    logits = model(ids[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
    aux = model.aux_loss()
    model.clear_aux_loss()
    total = loss if aux is None else loss + 0.01 * aux
    total.backward()
    return total.detach(), {name: param.grad.clone() for name, param in model.named_parameters()}


@pytest.mark.parametrize("accelerated", [True, False], ids=["accelerated", "reference"])
@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
@pytest.mark.parametrize("mode", ["full", "selective"])
def test_checkpointed_loss_and_gradients_equal_plain_bitwise(mode, moe, accelerated):
    plain = small_model(accelerated, **(MOE if moe else {}))
    ids = torch.randint(0, 64, (4, 25), generator=torch.Generator().manual_seed(2))
    expected_loss, expected = loss_and_gradients(plain, ids)
    checkpointed = apply_activation_checkpointing(copy.deepcopy(plain), mode)
    loss, gradients = loss_and_gradients(checkpointed, ids)
    # Recomputation repeats the same fp32 operations on the same inputs (and the same dropout
    # masks: torch restores the RNG), so the results are identical, not merely close.
    assert torch.equal(loss, expected_loss)
    assert gradients.keys() == expected.keys()
    for name, gradient in gradients.items():
        assert torch.equal(gradient, expected[name]), name
    if moe:  # the recomputation does not leave a stale load-balancing loss behind
        assert all(layer.aux_loss is None for layer in checkpointed.moe_layers())


def test_blocks_really_recompute_in_backward():
    model = apply_activation_checkpointing(small_model(True), "selective")
    calls = [0] * 3
    for index, block in enumerate(model.model.layers):
        block.mlp.register_forward_hook(lambda *_, index=index: calls.__setitem__(index, calls[index] + 1))
    loss_and_gradients(model, torch.randint(0, 64, (2, 9)))
    assert checkpointed_blocks("selective", 3) == [0, 2]
    assert calls == [2, 1, 2]  # blocks 0 and 2 ran their forward again during backward; block 1 did not


def test_state_dict_keys_and_values_are_unchanged_and_none_undoes_it():
    plain = small_model(True)
    model = apply_activation_checkpointing(copy.deepcopy(plain), "full")
    assert list(model.state_dict()) == list(plain.state_dict())
    assert all(torch.equal(value, plain.state_dict()[key]) for key, value in model.state_dict().items())
    assert all(ac.is_checkpointed(block) for block in model.model.layers)
    apply_activation_checkpointing(model, "none")
    assert [type(block) for block in model.model.layers] == [type(block) for block in plain.model.layers]


def test_generation_and_evaluation_never_checkpoint(monkeypatch):
    plain = small_model(True).eval()
    model = apply_activation_checkpointing(copy.deepcopy(plain), "full")

    def refuse(*args, **kwargs):
        raise AssertionError("checkpoint called outside training")

    monkeypatch.setattr(ac, "checkpoint", refuse)
    ids = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        assert torch.equal(model(ids), plain(ids))
        cache, plain_cache = model.new_cache(2, 16), plain.new_cache(2, 16)
        assert torch.equal(model(ids[:, :8], cache=cache), plain(ids[:, :8], cache=plain_cache))
        assert torch.equal(model(ids[:, 8:9], cache=cache), plain(ids[:, 8:9], cache=plain_cache))
    with torch.enable_grad():  # a KV cache is updated in place: never recomputed, even with gradients on
        model(ids[:, :4], cache=model.new_cache(2, 16))


def test_unknown_mode_is_refused():
    with pytest.raises(ConfigError, match="activation_checkpointing"):
        apply_activation_checkpointing(small_model(False), "half")


def pretrain_args(data, out, *extra: str) -> list[str]:
    return ["train", "pretrain", "--config", "tiny", "--data", str(data), "--out", str(out),
            "--model.dropout", "0.1", "--train.max_steps", "8", "--train.save_interval", "4",
            "--train.eval_interval", "4", "--train.keep_last", "3", "--train.progress", "false", *extra]


def rewind_to(run_dir, step: int) -> None:
    """Make `latest` point at an earlier checkpoint, as if the run had died right after saving it."""
    (checkpoints_root(run_dir) / LATEST_FILE).write_text(checkpoint_name(step) + "\n")


def test_cli_run_with_full_checkpointing_equals_plain_and_resumes_exactly(prepared_data, tmp_path):
    plain, checkpointed = tmp_path / "plain", tmp_path / "full"
    main(pretrain_args(prepared_data, plain))
    main(pretrain_args(prepared_data, checkpointed, "--train.activation_checkpointing", "full"))
    final = checkpoints_root(plain) / checkpoint_name(8) / "model.safetensors"
    weights = load_file(final)
    full_weights = load_file(checkpoints_root(checkpointed) / checkpoint_name(8) / "model.safetensors")
    assert full_weights.keys() == weights.keys()  # no wrapper prefixes in the saved names
    assert all(torch.equal(full_weights[name], weights[name]) for name in weights)

    resumed = tmp_path / "resumed"
    shutil.copytree(checkpointed, resumed)
    rewind_to(resumed, 4)
    main([*pretrain_args(prepared_data, resumed, "--train.activation_checkpointing", "full"), "--resume"])
    again = load_file(checkpoints_root(resumed) / checkpoint_name(8) / "model.safetensors")
    assert all(torch.equal(again[name], weights[name]) for name in weights)
