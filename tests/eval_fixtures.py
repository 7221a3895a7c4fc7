"""Shared pieces of the evaluation tests: a tiny checkpoint whose tokenizer knows English and
Chinese, and benchmark files in the layouts people download (written here, never fetched)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import torch

from acornlm.model import ModelConfig, Transformer
from acornlm.model.checkpoint import write_model_files
from acornlm.tokenizer import train_tokenizer

TEXT = ("Question: which is a fruit? Answer: apple. The sky is blue and the grass is green. "
        "以下是中国关于注册会计师的单项选择题，请选出其中的正确答案。答案：天空是蓝色的。😀 ")
CEVAL_HEADER = ["id", "question", "A", "B", "C", "D", "answer", "explanation"]


def make_checkpoint(directory: Path, context: int = 256, seed: int = 0) -> Path:
    """A random 2-layer model (GQA) with its BPE tokenizer: every weight perturbed so nothing cancels."""
    tokenizer_dir = directory.parent / f"{directory.name}-tokenizer"
    train_tokenizer([TEXT * 4] * 4, "bpe", 320).save(tokenizer_dir)
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context,
                         rope_theta=5000.0, initializer_range=0.3)
    model = Transformer(config)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    directory.mkdir(parents=True)
    write_model_files(directory, model, {"stage": "pretrain", "step": 1}, tokenizer_dir=tokenizer_dir)
    return directory


def write_csv(path: Path, header: list[str] | None, rows: list[list]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        if header:
            writer.writerow(header)
        writer.writerows(rows)
    return path


def write_ceval(root: Path, subject: str = "accountant", questions: int = 8) -> Path:
    """C-Eval's layout: dev (with explanations), val (answers), test (no answers)."""
    write_csv(root / "dev" / f"{subject}_dev.csv", CEVAL_HEADER,
              [[i, f"示例{i}：一加一等于几？", "1", "2", "3", "4", "B", "因为"] for i in range(5)])
    write_csv(root / "val" / f"{subject}_val.csv", CEVAL_HEADER[:-1],
              [[i, f"问题{i}：天空是什么颜色？😀", "红色", "蓝色", "绿色", "黄色", "ABCD"[i % 4]]
               for i in range(questions)])
    write_csv(root / "test" / f"{subject}_test.csv", CEVAL_HEADER[:-2],
              [[i, "没有答案的问题", "1", "2", "3", "4"] for i in range(3)])
    return root


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def arc_records(count: int = 6) -> list[dict]:
    fruits = ["apple", "a smooth grey rock", "car", "cloud of rain"]
    return [{"id": f"q{i}", "question": f"Which of these is a fruit ({i})?",
             "choices": {"text": fruits[i % 4:] + fruits[:i % 4], "label": ["A", "B", "C", "D"]},
             "answerKey": "ABCD"[(4 - i % 4) % 4]} for i in range(count)]


# An lm-eval task over a local ARC-style jsonl (offline): `.format(name=..., data=path)`.
ARC_TASK_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{choices.label.index(answerKey)}}}}"
doc_to_choice: "{{{{choices.text}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""
