"""`acornlm demo` (what `make demo` runs), end to end on a small generated corpus."""

import pytest

import acornlm
from acornlm.cli import main
from acornlm.model.checkpoint import resolve_checkpoint


def write_corpus(root):
    lines = ["Romeo.\nBut soft, what light through yonder window breaks?\n",
             "Juliet.\nO Romeo, Romeo, wherefore art thou Romeo?\n",
             "King Henry.\nOnce more unto the breach, dear friends, once more.\n"]
    for split, count in (("train", 6), ("val", 2)):
        (root / split).mkdir(parents=True)
        for i in range(count):
            (root / split / f"work{i}.txt").write_text("".join(lines[(i + j) % 3] for j in range(40)))


def demo_args(corpus, out, *extra):
    return ["demo", "--out", str(out), "--corpus", str(corpus), "--preset", "tiny", "--minutes", "0.05",
            "--vocab-size", "300", "--max_new_tokens", "8", *extra]


def test_demo_runs_the_whole_pipeline(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    write_corpus(corpus)
    out = tmp_path / "demo"
    # a fine-tuning budget under a minute runs every stage briefly, on little data
    main(demo_args(corpus, out, "--finetune-minutes", "0.1", "--eval-examples", "4"))
    err = capsys.readouterr().err
    assert "before training" in err and "after training" in err
    summary = (out / "summary.md").read_text()
    assert "final val bits per byte" in summary and "Before training" in summary
    assert "verified with transformers" in summary and (out / "hf" / "config.json").is_file()
    assert (out / "run" / "loss_curve.png").stat().st_size > 0
    assert (out / "data" / "meta.json").is_file()
    # the trained checkpoint loads through the public API
    lm = acornlm.load(out / "run")
    assert isinstance(lm.generate("Romeo.\n", max_new_tokens=5, temperature=0), str)
    # fine-tuning: SFT -> GRPO -> DPO, each from the previous stage, with figures before and after
    for stage, init in (("sft", out / "run"), ("grpo", out / "sft"), ("dpo", out / "grpo")):
        info = acornlm.load(out / stage).info
        assert info["stage"] == stage and info["init"] == str(resolve_checkpoint(init))
    assert "## Fine-tuning" in summary
    for figure in ("| arithmetic | ", "before SFT | after SFT", "before GRPO | after GRPO", "before DPO | after DPO",
                   "| preference accuracy (implicit reward"):
        assert figure in summary
    assert "  before: arithmetic" in err and "  after:  arithmetic" in err and "preference accuracy" in err
    # a second demo reuses tokenizer and data, and replaces the run; --finetune none stops after the export
    main(demo_args(corpus, out, "--finetune", "none"))
    assert "reusing" in capsys.readouterr().err
    assert "## Fine-tuning" not in (out / "summary.md").read_text()


def test_demo_finetune_lora_settings():
    from acornlm.cli.demo_finetune import finetune_settings
    from acornlm.model import ModelConfig

    config = ModelConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, max_position_embeddings=96)
    full = finetune_settings(config, "full", 10.0, 200, 16, 0, "cpu")
    lora = finetune_settings(config, "lora", 10.0, 200, 16, 0, "cpu")
    assert not full.sft_lora.enabled and lora.sft_lora.rank == 16
    assert lora.sft_train.learning_rate > full.sft_train.learning_rate  # adapters learn from small updates
    assert full.grpo_eval_examples == 500 and full.dpo_eval_pairs == 100
    # a fast machine (this tiny model) would fit far more SFT steps: the cap keeps arithmetic's jump
    # from finishing before GRPO, which would leave GRPO nothing to raise
    from acornlm.cli.demo_finetune import SFT_MAX_STEPS
    assert full.sft_train.max_steps == SFT_MAX_STEPS


@pytest.mark.parametrize("option,value,message", [
    ("--finetune", "partial", "--finetune must be one of full, lora, none"),
    ("--finetune-minutes", "-1", "--finetune_minutes must be > 0"),
    ("--eval-examples", "0", "--eval_examples must be a positive number"),
    ("--lora-rank", "0", "--lora_rank must be a positive integer"),
])
def test_demo_rejects_bad_finetune_options(tmp_path, capsys, option, value, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--out", str(tmp_path / "demo"), option, value])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()  # rejected before any work


def test_demo_picks_the_faster_thread_count():
    import torch

    from acornlm.cli.demo_budget import choose_threads
    from acornlm.errors import ConfigError

    default = torch.get_num_threads()
    busy = {1: 0.5}  # other work keeps the cores busy: one thread runs a step faster than several
    assert choose_threads(0, lambda: busy.get(torch.get_num_threads(), 2.0)) == (1 if default > 1 else default)
    quiet = {1: 2.0}
    assert choose_threads(0, lambda: quiet.get(torch.get_num_threads(), 1.0)) == default
    assert torch.get_num_threads() == default  # the caller applies the choice
    assert choose_threads(3, lambda: 1 / 0) == 3  # an explicit choice is not timed
    with pytest.raises(ConfigError, match="--threads"):
        choose_threads(-1, lambda: 1.0)


def test_demo_times_steps_with_the_real_trainer(monkeypatch):
    """The demo sizes its runs from steps of the Trainer itself, so the estimate is what the run sees."""
    from acornlm.cli.demo_budget import TIMED_STEPS, step_seconds
    from acornlm.model import ModelConfig
    from acornlm.train.config import TrainConfig
    from acornlm.train.trainer import Trainer

    runs = []
    real_fit = Trainer.fit

    def fit(self):
        runs.append(self.config.max_steps)
        return real_fit(self)

    monkeypatch.setattr(Trainer, "fit", fit)
    config = ModelConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, max_position_embeddings=32)
    seconds = step_seconds(config, TrainConfig(batch_size=2, seq_len=16), "cpu")
    assert runs == [TIMED_STEPS] and 0 < seconds < 10
