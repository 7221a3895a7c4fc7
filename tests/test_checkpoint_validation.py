"""A checkpoint's config.json is input: its values and its agreement with the weights are checked
before any memory is allocated from it, and a malformed file gives one clear error naming it."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

import acornlm.model.checkpoint as checkpoint_module
from acornlm.cli import main
from acornlm.errors import CheckpointError
from acornlm.model import ModelConfig, Transformer
from acornlm.model.checkpoint import CONFIG_FILE, load_model, read_checkpoint_config, write_model_files

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory):
    """A tiny checkpoint (RoPE, 2 layers, hidden 32) written the way training writes one."""
    directory = tmp_path_factory.mktemp("good") / "ckpt"
    directory.mkdir()
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=64, rope_theta=10000.0)
    write_model_files(directory, Transformer(config), {"step": 1})
    return directory


@pytest.fixture
def ckpt(good_checkpoint, tmp_path):
    """A fresh copy of the good checkpoint, for a test to corrupt."""
    return shutil.copytree(good_checkpoint, tmp_path / "ckpt")


def set_model_field(ckpt, **values) -> None:
    """Rewrite config.json with some model fields replaced (NaN and Infinity as Python's json writes them)."""
    info = json.loads((ckpt / CONFIG_FILE).read_text())
    info["model"].update(values)
    (ckpt / CONFIG_FILE).write_text(json.dumps(info))


@pytest.fixture
def weights_never_read(monkeypatch):
    """Fail the test if the tensor data is loaded: the config must be refused from the header alone."""
    def refuse(*args, **kwargs):
        raise AssertionError("the weights were loaded before config.json was checked against them")

    monkeypatch.setattr(checkpoint_module, "load_file", refuse)


def test_the_good_checkpoint_loads(good_checkpoint):
    model, info = load_model(good_checkpoint)
    assert info["step"] == 1 and model.config.hidden_size == 32


@pytest.mark.parametrize(("field", "value", "reason"), [
    ("max_position_embeddings", 10**12, "max_position_embeddings=1000000000000 is beyond the sanity bound"),
    ("max_position_embeddings", 1e12, "max_position_embeddings must be a positive integer"),
    ("num_hidden_layers", 10**6, "num_hidden_layers=1000000 is beyond the sanity bound"),
    ("vocab_size", 10**9, "vocab_size=1000000000 is beyond the sanity bound"),
    ("rope_theta", math.nan, "rope_theta must be a finite number > 0, got nan"),
    ("rope_theta", math.inf, "rope_theta must be a finite number > 0, got inf"),
    ("rope_theta", -1.0, "rope_theta must be a finite number > 0"),
    ("rope_theta", "10000", "rope_theta must be a finite number > 0"),
    ("norm_eps", math.nan, "norm_eps must be a finite number >= 0"),
    ("dropout", math.nan, "dropout must be a finite number in"),
    ("hidden_size", True, "hidden_size must be a positive integer, got True"),
    ("vocab_size", 0, "vocab_size is 0"),
])
def test_bad_values_are_refused_naming_the_file_and_field(ckpt, weights_never_read, field, value, reason):
    set_model_field(ckpt, **{field: value})
    with pytest.raises(CheckpointError, match=rf"{ckpt / CONFIG_FILE}: invalid model section: .*{reason}"):
        load_model(ckpt)


def test_hidden_size_that_disagrees_with_the_weights_fails_before_allocating(ckpt, weights_never_read):
    """65536 × 65536 projections would be 17 GB for a file of a few hundred KB."""
    set_model_field(ckpt, hidden_size=65536)
    with pytest.raises(CheckpointError) as info:
        load_model(ckpt)
    message = str(info.value)
    assert f"{ckpt / 'model.safetensors'} does not match {ckpt / CONFIG_FILE}" in message
    assert "model.hidden_size=65536" in message and "[64, 32] in the file" in message


@pytest.mark.parametrize(("values", "reason"), [
    ({"num_hidden_layers": 3}, "holds 2 layers, but .* says model.num_hidden_layers=3"),
    ({"intermediate_size": 48}, r"implies \[32, 48\] \(check model.intermediate_size=48\)"),
    ({"vocab_size": 65}, r"model.embed_tokens.weight has shape \[64, 32\] .* model.vocab_size=65"),
    ({"position": "learned"}, r"missing \['model.embed_positions.weight'\]"),
])
def test_config_that_disagrees_with_the_weights_names_the_field(ckpt, weights_never_read, values, reason):
    set_model_field(ckpt, **values)
    with pytest.raises(CheckpointError, match=reason):
        load_model(ckpt)


@pytest.mark.parametrize(("text", "reason"), [
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ('{"model": ' * 100_000 + "{}" + "}" * 100_000, "nested too deeply"),
    ('{"model": {"hidden_size": ' + "9" * 5000 + "}}", "is corrupt: .*digits"),
    ('{"model": {"hidden_size": 32,\n "vocab_size": }}', "is corrupt: line 2, column"),
    ("[1, 2]", "is not a JSON object"),
    ('{"format": "acornlm"}', "no `model` section"),
    ('{"model": [1]}', "no `model` section"),
])
def test_malformed_json_gives_a_clear_error_naming_the_file(ckpt, text, reason):
    (ckpt / CONFIG_FILE).write_text(text)
    with pytest.raises(CheckpointError, match=rf"{ckpt / CONFIG_FILE} .*{reason}"):
        read_checkpoint_config(ckpt)
    with pytest.raises(CheckpointError, match=reason):
        load_model(ckpt)


def test_non_utf8_and_oversized_files_are_refused(ckpt, monkeypatch):
    (ckpt / CONFIG_FILE).write_bytes(b'{"model": "\xff"}')
    with pytest.raises(CheckpointError, match="is not UTF-8 text"):
        load_model(ckpt)
    (ckpt / CONFIG_FILE).write_text("{}" + " " * 2000)
    monkeypatch.setattr(checkpoint_module, "MAX_CONFIG_BYTES", 1000)
    with pytest.raises(CheckpointError, match=r"is 2,002 bytes; a config.json is a few KB"):
        load_model(ckpt)


def test_corrupt_safetensors_header_is_a_checkpoint_error(ckpt):
    (ckpt / "model.safetensors").write_bytes((10**12).to_bytes(8, "little") + b"{}")
    with pytest.raises(CheckpointError, match="model.safetensors is corrupt or unreadable"):
        load_model(ckpt)


def test_hf_import_reads_config_json_through_the_same_checks(tmp_path):
    from acornlm.export.hf_import import import_hf

    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(CheckpointError, match=rf"{tmp_path / 'hf' / 'config.json'} is corrupt: .*nested too deeply"):
        import_hf(tmp_path / "hf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_generate_cli_ends_in_one_line_for_a_nan_rope_theta(ckpt, capsys):
    set_model_field(ckpt, rope_theta=math.nan)
    with pytest.raises(SystemExit) as info:
        main(["generate", "--ckpt", str(ckpt), "--prompt", "hi", "--device", "cpu"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "rope_theta must be a finite number > 0, got nan" in err
    assert str(ckpt / CONFIG_FILE) in err
