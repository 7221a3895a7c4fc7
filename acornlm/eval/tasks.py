"""Evaluation on the synthetic chat tasks of acornlm/data/tasks.py: the model's greedy replies,
scored by each task's exact-match checker.

    from acornlm.eval.tasks import evaluate_tasks
    accuracy = evaluate_tasks(lm, ["arithmetic", "reverse"], n=50, seed=0)   # {"arithmetic": 0.3, ...}

Held-out split: `evaluate_tasks` asks `split="heldout"` questions, which training data
(`split="train"`) can never contain, whatever the seeds.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from acornlm.data.chat import render_prompt
from acornlm.data.tasks import TASKS, make_examples, parse_tasks
from acornlm.infer.api import LanguageModel
from acornlm.infer.generate import fit_prompt_to_context, generate_tokens, new_token_budget
from acornlm.infer.sampling import SamplingParams

# --- evaluation ---

STOP_IDS = (0, 2)  # <|endoftext|> and <|im_end|> (fixed ids in every acornlm tokenizer) end a reply


def reply(lm: LanguageModel, prompt: str, max_new_tokens: int = 64) -> str:
    """The model's greedy reply to one user message, rendered with the chat template.

    Generation stops at <|im_end|> (the end of an assistant turn) or <|endoftext|>.
    """
    prompt_ids = render_prompt(lm.tokenizer, [{"role": "user", "content": prompt}])
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    tokens = list(generate_tokens(lm.model, prompt_ids, params, eos_ids=STOP_IDS, vocab_size=lm.tokenizer.vocab_size))
    return lm.tokenizer.decode(tokens)


def replies(lm: LanguageModel, prompts: Sequence[str], max_new_tokens: Sequence[int]) -> list[str]:
    """Greedy replies to many user messages: what `reply` gives for each, decoded in batches.

    Prompts whose rendered ids have the same length share one batch (no padding needed): one
    prefill, then one forward pass per new token for all of them. Much faster than one at a time.
    """
    model, tokenizer = lm.model, lm.tokenizer
    context = model.config.max_position_embeddings
    ids = [fit_prompt_to_context(render_prompt(tokenizer, [{"role": "user", "content": p}]), context)
           for p in prompts]
    groups: dict[int, list[int]] = {}
    for index, prompt_ids in enumerate(ids):
        groups.setdefault(len(prompt_ids), []).append(index)
    texts = [""] * len(prompts)
    device = model.device
    with torch.inference_mode():
        for length, members in groups.items():
            budgets = [new_token_budget(length, max_new_tokens[i], context) for i in members]
            steps = max(budgets)
            if steps == 0:
                continue
            cache = model.new_cache(len(members), length + steps - 1)
            batch = torch.tensor([ids[i] for i in members], dtype=torch.long, device=device)
            logits = model(batch, cache)[:, -1, :tokenizer.vocab_size]
            generated: list[list[int]] = [[] for _ in members]
            done = [budget == 0 for budget in budgets]
            for step in range(steps):
                next_ids = logits.argmax(dim=-1)
                for row, token in enumerate(next_ids.tolist()):
                    if done[row]:
                        continue
                    if token in STOP_IDS:
                        done[row] = True
                    else:
                        generated[row].append(token)
                        done[row] = len(generated[row]) >= budgets[row]
                if all(done) or step == steps - 1:
                    break
                logits = model(next_ids[:, None], cache)[:, -1, :tokenizer.vocab_size]
            for row, index in enumerate(members):
                texts[index] = tokenizer.decode(generated[row])
    return texts


def evaluate_tasks(lm: LanguageModel, tasks: str | Sequence[str] | None = None, n: int = 50, seed: int = 0,
                   split: str = "heldout", samples: dict[str, list[tuple[str, str, str]]] | None = None
                   ) -> dict[str, float]:
    """Exact-match accuracy per task on `n` held-out examples, answering greedily with the chat template.

    `samples`, when given, receives (prompt, expected, reply) triples per task for display.
    A reply may run for the answer's length plus 16 tokens: longer is wrong anyway.
    """
    accuracy = {}
    for task in parse_tasks(tasks):
        examples = make_examples(task, n, seed, split)
        budgets = [len(lm.tokenizer.encode(example.answer)) + 16 for example in examples]
        texts = replies(lm, [example.prompt for example in examples], budgets)
        correct = sum(TASKS[task].check(text, example.answer) for text, example in zip(texts, examples))
        if samples is not None:
            samples[task] = [(example.prompt, example.answer, text) for example, text in zip(examples, texts)]
        accuracy[task] = correct / n if n else 0.0
    return accuracy
