"""`acornlm demo` (what `make demo` runs), end to end on a small generated corpus."""

import acornlm
from acornlm.cli import main


def write_corpus(root):
    lines = ["Romeo.\nBut soft, what light through yonder window breaks?\n",
             "Juliet.\nO Romeo, Romeo, wherefore art thou Romeo?\n",
             "King Henry.\nOnce more unto the breach, dear friends, once more.\n"]
    for split, count in (("train", 6), ("val", 2)):
        (root / split).mkdir(parents=True)
        for i in range(count):
            (root / split / f"work{i}.txt").write_text("".join(lines[(i + j) % 3] for j in range(40)))


def test_demo_runs_the_whole_pipeline(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    write_corpus(corpus)
    out = tmp_path / "demo"
    main(["demo", "--out", str(out), "--corpus", str(corpus), "--preset", "tiny", "--minutes", "0.05",
          "--vocab-size", "300", "--max_new_tokens", "8"])
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
    # a second demo reuses tokenizer and data, and replaces the run
    main(["demo", "--out", str(out), "--corpus", str(corpus), "--preset", "tiny", "--minutes", "0.05",
          "--vocab-size", "300", "--max_new_tokens", "8"])
    assert "reusing" in capsys.readouterr().err
