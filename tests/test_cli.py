"""The command line: argv conveniences, presets, --help, and one-line errors."""

import json
import subprocess
import sys

import pytest

from acornlm.cli import normalize_argv
from acornlm.model import ModelConfig
from acornlm.presets import list_presets, load_preset, preset_path
from acornlm.train.config import TrainConfig


def test_hyphenated_options_become_underscored():
    assert normalize_argv(["tokenizer", "train", "--vocab-size", "300"]) == [
        "tokenizer", "train", "--vocab_size", "300"]
    assert normalize_argv(["x", "--train.max-steps=5"]) == ["x", "--train.max_steps=5"]


def test_multi_value_option_is_collected_into_a_list():
    out = normalize_argv(["tokenizer", "train", "--input", "a.txt", "b dir/", "--out", "o"])
    assert out == ["tokenizer", "train", "--input", json.dumps(["a.txt", "b dir/"]), "--out", "o"]


def test_bare_flag_means_true():
    assert normalize_argv(["train", "pretrain", "--resume"]) == ["train", "pretrain", "--resume", "true"]
    assert normalize_argv(["train", "pretrain", "--resume", "--out", "x"])[2:4] == ["--resume", "true"]
    assert normalize_argv(["train", "pretrain", "--help"]) == ["train", "pretrain", "--help"]


def test_fetch_name_is_positional():
    assert normalize_argv(["data", "fetch", "shakespeare", "--out", "d"]) == [
        "data", "fetch", "--name", "shakespeare", "--out", "d"]


def test_presets_resolve_to_files_and_model_sections():
    out = normalize_argv(["train", "pretrain", "--config", "tiny", "--model", "minimind2-small"])
    assert normalize_argv(["import", "hf", "--model", "tiny"])[3] == "tiny"  # a path, not a preset
    assert out[3] == str(preset_path("tiny"))
    assert json.loads(out[5])["hidden_size"] == 512
    # a path that is not a preset name passes through untouched
    assert normalize_argv(["--config", "my.yaml"]) == ["--config", "my.yaml"]


@pytest.mark.parametrize("name", list_presets())
def test_every_preset_builds_valid_configs(name):
    data = load_preset(name)
    model = ModelConfig(**data["model"])
    TrainConfig(**data.get("train", {}))
    assert model.hidden_size % model.num_attention_heads == 0


def test_expected_presets_exist():
    assert {"tiny", "cpu-demo", "gpt2-124m", "nanogpt-shakespeare-char", "minimind2-small",
            "minimind3"} <= set(list_presets())
    mm = ModelConfig(**load_preset("minimind2-small")["model"])
    assert (mm.hidden_size, mm.num_hidden_layers, mm.num_attention_heads, mm.num_key_value_heads,
            mm.vocab_size, mm.intermediate_size, mm.rope_theta, mm.tie_word_embeddings) == (
        512, 8, 8, 2, 6400, 1408, 1e6, True)


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "acornlm", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=120)


def test_pretrain_help_lists_every_field_with_defaults():
    result = run_cli("train", "pretrain", "--help")
    assert result.returncode == 0, result.stderr
    for field in ("--model.hidden_size", "--model.num_key_value_heads", "--model.rope_theta",
                  "--train.max_steps", "--train.max_minutes", "--train.grad_accum_steps", "--train.seed",
                  "--train.dtype", "--train.compile", "--data", "--out", "--resume"):
        assert field in result.stdout, field
    assert "default: 512" in result.stdout  # hidden_size default is shown


def test_top_level_help_lists_groups():
    result = run_cli("--help")
    assert result.returncode == 0
    for group in ("data", "tokenizer", "train", "generate", "demo"):
        assert group in result.stdout


def test_impossible_model_config_is_one_line_error(tmp_path):
    result = run_cli("train", "pretrain", "--data", str(tmp_path), "--out", str(tmp_path / "run"),
                     "--model.hidden_size", "100", "--model.num_attention_heads", "3")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "not divisible" in result.stderr


def test_unknown_preset_is_one_line_error(tmp_path):
    result = run_cli("train", "pretrain", "--config", "no-such-preset.yaml", "--data", str(tmp_path))
    assert result.returncode != 0
    assert "Traceback" not in result.stderr


def test_stage_options_are_config_dataclasses_with_yaml_defaults(capsys):
    """`--dpo.beta`, `--grpo.group_size`, `--distill.alpha`: each stage's options are a config dataclass,
    its defaults (and the stage's train defaults) read from acornlm/train/defaults/STAGE.yaml."""
    import dataclasses

    from acornlm.cli import align, finetune, main
    from acornlm.train.config import TrainConfig, stage_defaults

    for stage, train, options in (("dpo", align.DEFAULT_DPO_TRAIN, align.DEFAULT_DPO),
                                  ("grpo", align.DEFAULT_GRPO_TRAIN, align.DEFAULT_GRPO),
                                  ("distill", align.DEFAULT_DISTILL_TRAIN, align.DEFAULT_DISTILL),
                                  ("sft", finetune.DEFAULT_SFT_TRAIN, None)):
        defaults = stage_defaults(stage)
        assert train == TrainConfig(**defaults["train"])
        if options is not None:
            assert dataclasses.asdict(options) == defaults[stage]
    for command, option, value, message in (("dpo", "--dpo.beta", "-1", "--dpo.beta must be > 0"),
                                            ("grpo", "--grpo.group_size", "1", "--grpo.group_size must be >= 2"),
                                            ("grpo", "--grpo.temperature", "5", "temperature must be a number in"),
                                            ("distill", "--distill.alpha", "2", "--distill.alpha must be in [0, 1]")):
        with pytest.raises(SystemExit) as exit_info:
            main(["train", command, "--init", "x", "--out", "y", option, value])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "grpo", "--help"])
    assert "--grpo.group_size" in capsys.readouterr().out
