"""`acornlm eval harness`: lm-evaluation-harness, offline, on a local task. Our model class gives
the same log-likelihoods (within 1e-4) and accuracy as lm-eval's own Hugging Face backend on the
HF export of the same checkpoint, and as `acornlm eval bench` on the same items; its rolling
log-likelihood and greedy generation agree with the HF backend too."""

from __future__ import annotations

import json

import pytest
from eval_fixtures import ARC_TASK_YAML, arc_records, make_checkpoint, write_jsonl

from acornlm import cli

lm_eval = pytest.importorskip("lm_eval", reason="pip install 'acornlm[eval]'")
pytest.importorskip("transformers")

from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from acornlm.eval.harness import AcornLM  # noqa: E402  (needs lm_eval)

pytestmark = pytest.mark.usefixtures("one_thread")

ROLLING_TASK = """task: acorn_local_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: bits_per_byte
"""
GEN_TASK = """task: acorn_local_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n", "."]
  max_gen_toks: 12
  do_sample: false
metric_list:
  - metric: exact_match
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("harness")
    ckpt = make_checkpoint(root / "ckpt", context=128)
    cli.main(["export", "hf", "--ckpt", str(ckpt), "--out", str(root / "hf"), "--verify", "false"])
    tasks = root / "tasks"
    tasks.mkdir()
    arc = write_jsonl(root / "data" / "arc.jsonl", arc_records(8))
    texts = write_jsonl(root / "data" / "texts.jsonl", [
        {"text": "The sky is blue and the grass is green. " * 12}, {"text": "天空是蓝色的。以下是中国关于注册会计师的题。😀"}])
    prompts = write_jsonl(root / "data" / "gen.jsonl", [{"prompt": "Question: which is a fruit?", "answer": " apple"},
                                                         {"prompt": "天空是", "answer": "蓝色"}])
    (tasks / "mc.yaml").write_text(ARC_TASK_YAML.format(name="acorn_local_mc", data=arc), encoding="utf-8")
    (tasks / "ppl.yaml").write_text(ROLLING_TASK.format(data=texts), encoding="utf-8")
    (tasks / "gen.yaml").write_text(GEN_TASK.format(data=prompts), encoding="utf-8")
    return {"root": root, "ckpt": ckpt, "hf": root / "hf", "tasks": tasks, "arc": arc}


def evaluate(model, setup, tasks: list[str]) -> dict:
    return lm_eval.simple_evaluate(model=model, tasks=tasks, task_manager=TaskManager(include_path=str(setup["tasks"])),
                                   log_samples=True, random_seed=0, numpy_random_seed=0, torch_random_seed=0)


@pytest.fixture(scope="module")
def both(setup, monkeypatch_module):
    monkeypatch_module.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch_module.setenv("HF_HUB_OFFLINE", "1")
    tasks = ["acorn_local_mc", "acorn_local_ppl", "acorn_local_gen"]
    ours = evaluate(AcornLM(pretrained=str(setup["ckpt"]), batch_size=3), setup, tasks)
    theirs = evaluate(HFLM(pretrained=str(setup["hf"]), dtype="float32", device="cpu", batch_size=3), setup, tasks)
    return ours, theirs


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def test_multiple_choice_log_likelihoods_and_accuracy_match_the_hf_backend_and_eval_bench(both, setup, tmp_path):
    ours, theirs = both
    mine = [[r[0][0] for r in s["resps"]] for s in ours["samples"]["acorn_local_mc"]]
    hf = [[r[0][0] for r in s["resps"]] for s in theirs["samples"]["acorn_local_mc"]]
    assert len(mine) == 8
    for a, b in zip(mine, hf):
        assert a == pytest.approx(b, abs=1e-4)
    for metric in ("acc,none", "acc_norm,none"):
        assert ours["results"]["acorn_local_mc"][metric] == theirs["results"]["acorn_local_mc"][metric]
    # the same items through `acornlm eval bench --format arc`: the same numbers
    out = tmp_path / "bench.json"
    cli.main(["eval", "bench", "--ckpt", str(setup["ckpt"]), "--data", str(setup["arc"]), "--format", "arc",
              "--out", str(out), "--progress", "false"])
    bench = json.loads(out.read_text(encoding="utf-8"))
    for item, expected in zip(bench["items"], mine):
        assert item["logprobs"] == pytest.approx(expected, abs=1e-4)
    assert bench["accuracy"] == pytest.approx(ours["results"]["acorn_local_mc"]["acc,none"])
    assert bench["acc_norm"] == pytest.approx(ours["results"]["acorn_local_mc"]["acc_norm,none"])


def test_rolling_log_likelihood_and_generation_match_the_hf_backend(both):
    ours, theirs = both
    mine = [s["resps"][0][0] for s in ours["samples"]["acorn_local_ppl"]]
    hf = [s["resps"][0][0] for s in theirs["samples"]["acorn_local_ppl"]]
    assert mine == pytest.approx(hf, abs=1e-3) and all(v < 0 for v in mine)
    assert ours["results"]["acorn_local_ppl"]["bits_per_byte,none"] == pytest.approx(
        theirs["results"]["acorn_local_ppl"]["bits_per_byte,none"], rel=1e-5)
    generated = [s["resps"][0][0] for s in ours["samples"]["acorn_local_gen"]]
    assert generated == [s["resps"][0][0] for s in theirs["samples"]["acorn_local_gen"]]
    assert all("\n" not in text and "." not in text for text in generated)


def test_cli_runs_a_local_task_and_refuses_unknown_ones(setup, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    out = tmp_path / "lm_eval.json"
    cli.main(["eval", "harness", "--ckpt", str(setup["ckpt"]), "--tasks", "acorn_local_mc",
              "--include_path", str(setup["tasks"]), "--limit", "4", "--out", str(out)])
    results = json.loads(out.read_text(encoding="utf-8"))["results"]["acorn_local_mc"]
    assert 0.0 <= results["acc,none"] <= 1.0
    assert "acorn_local_mc" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["eval", "harness", "--ckpt", str(setup["ckpt"]), "--tasks", "acorn_local_mcq",
                  "--include_path", str(setup["tasks"])])
    err = capsys.readouterr().err
    assert "unknown lm-eval task(s): acorn_local_mcq (close: acorn_local_mc" in err and "Traceback" not in err


def test_lm_eval_still_finds_its_own_models_after_ours_registers():
    from lm_eval.api.registry import get_model

    assert get_model("acornlm") is AcornLM
    assert get_model("hf") is HFLM
