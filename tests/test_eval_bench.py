"""`acornlm eval bench`: the files people download are read right, the scores are the log-likelihoods
computed by hand from the reference model, and bad files get errors that name the file and row."""

from __future__ import annotations

import json
import math

import pytest
import torch
from eval_fixtures import CEVAL_HEADER, arc_records, make_checkpoint, write_ceval, write_csv, write_jsonl

import acornlm
from acornlm import cli
from acornlm.errors import ConfigError
from acornlm.eval.bench import evaluate_benchmark, mean_stderr, text_requests
from acornlm.eval.benchmarks import Benchmark, Item, load_items, read_items
from acornlm.eval.likelihood import encode_pair, rolling_windows, score_continuations
from acornlm.model.checkpoint import load_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("bench") / "ckpt")


@pytest.fixture(scope="module")
def lm(ckpt):
    return acornlm.load(ckpt)


@pytest.fixture(scope="module")
def reference(ckpt):
    model, _ = load_model(ckpt)
    return model


def by_hand(model, context: list[int], continuation: list[int]) -> float:
    """log p(continuation | context) from one full forward pass of the reference model."""
    with torch.no_grad():
        logprobs = model(torch.tensor([(context + continuation)[:-1]])).log_softmax(-1)[0]
    return sum(logprobs[len(context) - 1 + i, token].item() for i, token in enumerate(continuation))


def test_scores_equal_hand_computed_log_likelihoods_in_any_batch(lm, reference):
    texts = [("Question: which is a fruit?\nAnswer:", " apple"), ("Question: which is a fruit?\nAnswer:", " A"),
             ("天空是", "蓝色的。😀"), ("", "The sky is blue"), ("Answer: ", "green")]
    pairs = [encode_pair(lm.tokenizer, c, x) for c, x in texts]
    expected = [by_hand(reference, c, x) for c, x in pairs]
    for batch_size in (1, 2, 16):
        scored = score_continuations(lm.model, pairs, batch_size=batch_size)
        assert [s.logprob for s in scored] == pytest.approx(expected, abs=1e-4)
    # lm-eval's conventions: trailing spaces move to the continuation; no context means end-of-text first
    assert pairs[4][0] == lm.tokenizer.encode("Answer:")
    assert pairs[3][0] == [lm.tokenizer.eot_id]
    # greedy: a continuation made of the argmax tokens is greedy, another is not
    context = lm.tokenizer.encode("The sky is")
    with torch.no_grad():
        first = reference(torch.tensor([context])).argmax(-1)[0, -1].item()
    greedy, other = score_continuations(lm.model, [(context, [first]), (context, [(first + 1) % 300])])
    assert greedy.greedy and not other.greedy


def test_a_shared_few_shot_prefix_is_computed_once_and_changes_nothing(lm, reference):
    shots = "Question: which is a fruit?\nAnswer: apple\n\n" * 6
    texts = [(shots + f"Question: the sky is {word}?\nAnswer:", f" {answer}")
             for word in ("blue", "green", "天空") for answer in ("A", "yes", "蓝色的")]
    pairs = [encode_pair(lm.tokenizer, c, x) for c, x in texts]
    assert len(pairs[0][0]) > 64
    shared = score_continuations(lm.model, pairs, batch_size=4, share_prefix=16)
    plain = score_continuations(lm.model, pairs, batch_size=4, share_prefix=0)
    assert [s.logprob for s in shared] == pytest.approx([s.logprob for s in plain], abs=1e-4)
    assert [s.greedy for s in shared] == [s.greedy for s in plain]
    expected = [by_hand(reference, c, x) for c, x in pairs]
    assert [s.logprob for s in shared] == pytest.approx(expected, abs=1e-4)


def test_a_context_longer_than_the_model_is_cut_from_the_left_and_counted(lm, reference):
    window = lm.config.max_position_embeddings
    context = [5 + i % 200 for i in range(window + 40)]
    [scored] = score_continuations(lm.model, [(context, [7, 8])])
    kept = (context + [7])[-window:]
    assert scored.truncated
    assert scored.logprob == pytest.approx(by_hand(reference, kept[:-1], [7, 8]), abs=1e-4)
    with pytest.raises(ConfigError, match="cannot be scored"):
        score_continuations(lm.model, [([1], list(range(window + 1)))])


def test_rolling_windows_score_every_token_once_with_enough_context():
    tokens = list(range(10, 30))
    pairs = rolling_windows(tokens, 0, window=8, stride=3)
    assert [t for _, cont in pairs for t in cont] == tokens
    for context, continuation in pairs:
        assert len(context) + len(continuation) - 1 <= 8
    assert pairs[0][0] == [0]
    assert len(pairs[-1][0]) + len(pairs[-1][1]) - 1 == 8  # the last window reaches back a full window
    with pytest.raises(ConfigError):
        rolling_windows(tokens, 0, window=8, stride=9)


def test_ceval_layout_letter_method_matches_the_prompt_written_by_hand(tmp_path, lm, reference):
    root = write_ceval(tmp_path / "ceval-exam")
    benchmark = load_items([root])
    assert benchmark.notes and "val" in benchmark.notes[0]  # test has no answers: val is scored
    assert len(benchmark.items) == 8 and len(benchmark.dev["accountant"]) == 5
    run = evaluate_benchmark(lm, benchmark, shots=2, method="letter", progress=False)
    item = run.results[1].item
    prompt = ("以下是中国关于注册会计师的单项选择题，请选出其中的正确答案。\n\n"
              "示例0：一加一等于几？\nA. 1\nB. 2\nC. 3\nD. 4\n答案： B\n\n"
              "示例1：一加一等于几？\nA. 1\nB. 2\nC. 3\nD. 4\n答案： B\n\n"
              f"{item.question}\nA. 红色\nB. 蓝色\nC. 绿色\nD. 黄色\n答案：")
    for letter, logprob in zip("ABCD", run.results[1].logprobs):
        context, continuation = encode_pair(lm.tokenizer, prompt, " " + letter)
        assert logprob == pytest.approx(by_hand(reference, context, continuation), abs=1e-4)


def planted(lm, items: list[Item], method: str, right: set[int]) -> list[Item]:
    """The same questions with the answer set to the model's own choice for `right`, another option otherwise."""
    benchmark = Benchmark(items, {}, [], [])
    choices = [r.prediction for r in evaluate_benchmark(lm, benchmark, method=method, progress=False).results]
    return [Item(i.benchmark, i.subject, i.question, i.choices,
                 pick if n in right else (pick + 1) % len(i.choices), i.where)
            for n, (i, pick) in enumerate(zip(items, choices))]


@pytest.mark.parametrize("method", ["likelihood", "letter"])
def test_accuracy_and_stderr_on_known_answers(tmp_path, lm, method):
    items = read_items(write_jsonl(tmp_path / "ARC-Challenge" / "test.jsonl", arc_records(8)))
    assert {i.subject for i in items} == {"ARC-Challenge"}
    known = planted(lm, items, method, right={0, 2, 5})
    run = evaluate_benchmark(lm, Benchmark(known, {}, [], []), method=method, progress=False)
    report = run.report()
    assert report["n"] == 8 and report["accuracy"] == pytest.approx(3 / 8)
    assert report["stderr"] == pytest.approx(math.sqrt((3 / 8) * (5 / 8) / 7))  # sample std / sqrt(n)
    assert [row["correct"] for row in report["items"]] == [n in {0, 2, 5} for n in range(8)]
    if method == "likelihood":  # acc_norm: log p divided by the option's length in characters
        expected = sum(max(range(4), key=lambda k: r.logprobs[k] / len(r.item.choices[k])) == r.item.answer
                       for r in run.results) / 8
        assert report["acc_norm"] == pytest.approx(expected)
    else:
        assert "acc_norm" not in report


def test_every_layout_is_read(tmp_path):
    write_csv(tmp_path / "cmmlu" / "test" / "agronomy.csv", ["", "Question", "A", "B", "C", "D", "Answer"],
              [[0, "农学问题？", "甲", "乙", "丙", "丁", "C"]])
    write_csv(tmp_path / "cmmlu" / "dev" / "agronomy.csv", ["", "Question", "A", "B", "C", "D", "Answer"],
              [[0, "示例？", "甲", "乙", "丙", "丁", "A"]])
    write_csv(tmp_path / "mmlu" / "test" / "anatomy_test.csv", None, [["Which bone?", "a", "b", "c", "d", "D"]])
    records = {
        "hellaswag.jsonl": {"activity_label": "Cooking", "ctx_a": "A man cuts bread.", "ctx_b": "he",
                            "endings": ["eats it [title] now", "flies", "sings", "runs"], "label": "0"},
        "piqa.jsonl": {"goal": "Open a jar", "sol1": "twist the lid", "sol2": "eat the jar", "label": 0},
        "winogrande.jsonl": {"sentence": "The cup fell off the table because _ was tilted.",
                             "option1": "the cup", "option2": "the table", "answer": "2"},
        "mmlu_hf.jsonl": {"question": "2+2?", "subject": "elementary_mathematics", "choices": ["3", "4", "5", "6"],
                          "answer": 1},
    }
    for name, record in records.items():
        write_jsonl(tmp_path / name, [record])
    benchmark = load_items([tmp_path / "cmmlu", tmp_path / "mmlu"] + [tmp_path / n for n in records])
    got = {(i.benchmark, i.subject): i for i in benchmark.items}
    assert got[("cmmlu", "agronomy")].answer == 2 and benchmark.dev["agronomy"][0].answer == 0
    assert got[("mmlu", "anatomy")].choices == ("a", "b", "c", "d") and got[("mmlu", "anatomy")].answer == 3
    swag = got[("hellaswag", "hellaswag")]
    assert swag.question == "Cooking: A man cuts bread. He" and swag.choices[0] == "eats it. now"
    assert got[("winogrande", "winogrande")].answer == 1
    assert got[("mmlu", "elementary_mathematics")].answer == 1
    wino = got[("winogrande", "winogrande")]
    assert text_requests(wino, "likelihood", []) == [
        ("The cup fell off the table because the cup", " was tilted."),
        ("The cup fell off the table because the table", " was tilted.")]


def test_parquet_export_is_read_like_jsonl(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    records = arc_records(3)
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "arc.parquet")
    write_jsonl(tmp_path / "arc.jsonl", records)
    strip = lambda items: [(i.question, i.choices, i.answer) for i in items]  # noqa: E731
    assert strip(read_items(tmp_path / "arc.parquet")) == strip(read_items(tmp_path / "arc.jsonl"))


@pytest.mark.parametrize("rows,header,message", [
    ([[0, "q", "1", "2"]], ["id", "question", "A", "B"], r"row 1 \(the header\) has columns \['id', 'question', 'A', 'B'\].*missing: C, D"),
    ([[0, "q", "1", "2", "3", "4", "E"]], CEVAL_HEADER[:-1], r"bad_val.csv:2: answer 'E' is not one of the choices \(A, B, C, D\)"),
    ([[0, "q", "1", "2", "3"]], CEVAL_HEADER[:-1], r"bad_val.csv:2: expected at least 7 cells, found 5"),
    ([], CEVAL_HEADER[:-1], r"no questions \(an empty subject\)"),
    ([[0, " ", "1", "2", "3", "4", "A"]], CEVAL_HEADER[:-1], r"bad_val.csv:2: the question is empty"),
])
def test_bad_csv_names_the_file_row_and_columns(tmp_path, rows, header, message):
    file = write_csv(tmp_path / "bad_val.csv", header, rows)
    with pytest.raises(ConfigError, match=message):
        read_items(file)


def test_bad_records_and_options_are_refused(tmp_path, lm):
    file = write_jsonl(tmp_path / "x.jsonl", [{"question": "q", "choices": {"text": ["a", "b"], "label": ["A", "B"]},
                                               "answerKey": "A"}, {"foo": 1}])
    with pytest.raises(ConfigError, match=r"x.jsonl:2: cannot tell which benchmark.*\['foo'\]"):
        read_items(file)
    with pytest.raises(ConfigError, match="unknown benchmark format 'gsm8k'; known: auto, ceval"):
        read_items(file, "gsm8k")
    with pytest.raises(ConfigError, match="does not exist"):
        load_items([tmp_path / "missing"])
    items = read_items(write_jsonl(tmp_path / "ok.jsonl", arc_records(2)))
    with pytest.raises(ConfigError, match="has 0 few-shot examples"):
        evaluate_benchmark(lm, Benchmark(items, {}, [], []), shots=1, progress=False)
    with pytest.raises(ConfigError, match="--method must be one of likelihood, letter"):
        evaluate_benchmark(lm, Benchmark(items, {}, [], []), method="logits", progress=False)


def test_mean_stderr_is_lm_evals():
    # mean 0.75; squared deviations 3 x 0.0625 + 0.5625 = 0.75; sample variance 0.25; std 0.5; / sqrt(4)
    assert mean_stderr([1.0, 0.0, 1.0, 1.0]) == pytest.approx(0.25)
    metrics = pytest.importorskip("lm_eval.api.metrics")
    values = [1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0]
    assert mean_stderr(values) == pytest.approx(metrics.mean_stderr(values))
    assert math.isnan(mean_stderr([1.0]))


def test_cli_writes_json_and_markdown_and_scores_an_hf_export_alike(tmp_path, ckpt, capsys):
    root = write_ceval(tmp_path / "ceval")
    arc = write_jsonl(tmp_path / "arc.jsonl", arc_records(4))
    arc_dev = write_jsonl(tmp_path / "arc_dev.jsonl", arc_records(2))  # subject "arc", as arc.jsonl
    out = tmp_path / "result.json"
    cli.main(["eval", "bench", "--ckpt", str(ckpt), "--data", str(root), str(arc), "--dev", str(arc_dev),
              "--shots", "1", "--out", str(out), "--progress", "false"])
    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["n"] == 12 and 0.0 <= report["accuracy"] <= 1.0
    assert {(r["benchmark"], r["subject"], r["n"]) for r in report["subjects"]} == {("ceval", "accountant", 8),
                                                                                    ("arc", "arc", 4)}
    assert "| ceval | accountant | 8 |" in out.with_suffix(".md").read_text(encoding="utf-8")
    assert "questions/s" in capsys.readouterr().out

    pytest.importorskip("transformers")
    cli.main(["export", "hf", "--ckpt", str(ckpt), "--out", str(tmp_path / "hf"), "--verify", "false"])
    cli.main(["eval", "bench", "--ckpt", str(tmp_path / "hf"), "--data", str(root), str(arc), "--dev", str(arc_dev),
              "--shots", "1", "--out", str(tmp_path / "hf.json"), "--progress", "false"])
    exported = json.loads((tmp_path / "hf.json").read_text(encoding="utf-8"))
    for mine, theirs in zip(report["items"], exported["items"]):
        assert mine["logprobs"] == pytest.approx(theirs["logprobs"], abs=1e-4)


def test_cli_errors_are_one_line(tmp_path, ckpt, capsys):
    file = write_csv(tmp_path / "bad_val.csv", ["id", "question", "A"], [[0, "q", "1"]])
    for argv in (["--data", str(file)], ["--data", str(tmp_path / "ceval")], [],
                 ["--data", str(file), "--exclude_contaminated"]):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["eval", "bench", "--ckpt", str(ckpt), *argv])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("acornlm: error:") and "Traceback" not in err
