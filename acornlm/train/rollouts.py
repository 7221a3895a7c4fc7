"""Online rollouts for the reinforcement-learning stages (GRPO, PPO): prompts, sampling, rewards.

Both stages do the same thing before their losses differ:

    train, val, line = rl_prompts(data, tasks, ...)          # prompt records, from files or synthetic tasks
    rollouts = Rollouts(policy, tokenizer, train, val, runner, reward_model=rm, num_samples=G, ...)
    rollouts.rollout(step, micro_step)   # sample G completions of each prompt with the policy, score them
    rollouts.eval_batch(i)               # greedy answers to held-out prompts, and their rewards

Sampling happens inside the Trainer's `batch(step, micro_step)` with acornlm's inference path,
seeded from (seed, step, micro_step, rank, slot): the samples, and therefore a resumed run, are a
pure function of the step and the weights. The reward of a completion is the sum of the Python
reward functions (acornlm/train/rewards.py) and, when one is given, a reward model's score of the
whole prompt + completion (acornlm/train/reward_model.py); both are deterministic.

Agentic RL: a prompt record that carries `tools` is played out as a multi-turn trajectory
(acornlm.infer.agent.rollout_group): the model calls a tool, the `ToolEnvironment`'s function runs
(with a timeout; failures become error texts, counted), its result is appended and the model goes
on; only the final answer is rewarded, and only the tokens the model sampled are trained. A record
with `enable_thinking` renders its prompt with that switch, and the reward reads the answer after
the think block.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from acornlm.data.agent_tasks import AGENT_FUNCTIONS, AGENT_TASKS
from acornlm.data.chat import IM_END_ID, render_prompt
from acornlm.data.conversations import split_conversations
from acornlm.data.preferences import collate_sequences
from acornlm.data.prompts import load_prompt_records, task_prompt_records
from acornlm.data.tasks import TASKS
from acornlm.data.tools import parse_reply
from acornlm.errors import ConfigError
from acornlm.infer.agent import Trajectory, rollout_group
from acornlm.infer.generate import generate_batch
from acornlm.infer.sampling import SamplingParams
from acornlm.infer.tools import load_tool_functions
from acornlm.model import Transformer
from acornlm.paths import as_path_list
from acornlm.tokenizer import Tokenizer
from acornlm.train.distributed import DistributedContext, log
from acornlm.train.losses import token_logprobs
from acornlm.train.reward_model import RewardModel, check_reward_tokenizer, load_reward_model
from acornlm.train.rewards import RewardRunner, load_reward_functions, task_reward
from acornlm.train.stage import MeanMetrics, example_indices


@dataclass(frozen=True)
class ToolEnvironment:
    """What tool calls run during agentic rollouts: name -> function, the turn limit and each call's timeout."""

    functions: Mapping[str, Callable[..., Any]] = field(default_factory=dict)
    max_turns: int = 3
    timeout_s: float = 2.0


def tool_environment(tools_file: str | Path | None, tasks: str | None, max_turns: int,
                     timeout_s: float) -> ToolEnvironment | None:
    """The functions of `--tools FILE.py` plus the built-in tools of the agent tasks named in `tasks`
    (the `price` task's price list); None when there are none."""
    functions: dict[str, Callable[..., Any]] = {}
    if tasks and any(name.strip() in AGENT_TASKS for name in tasks.split(",")):
        functions.update(AGENT_FUNCTIONS)
    if tools_file is not None:
        functions.update(load_tool_functions(tools_file))
    if not functions:
        return None
    if max_turns < 1 or timeout_s <= 0:
        raise ConfigError(f"--max_turns must be >= 1 and --tool_timeout > 0, got {max_turns} and {timeout_s}")
    return ToolEnvironment(functions, max_turns, timeout_s)


def answer_text(text: str, record: dict[str, Any]) -> str:
    """The answer a reward reads: after the think block when the prompt asked for thinking, else the text."""
    if record.get("enable_thinking") is True:
        return parse_reply(text, in_thinking=True).content
    return text


def validation_loss(metrics: MeanMetrics, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """An RL stage's validation on an `eval_batch`: logs the mean reward of the greedy answers (and
    the task accuracy, for synthetic tasks) and returns minus the reward as the "loss"."""
    mean_reward = batch["eval_rewards"].mean()
    extra = {"task_accuracy": batch["eval_task_accuracy"]} if "eval_task_accuracy" in batch else {}
    metrics.add(False, {"reward": mean_reward, **extra})
    return -mean_reward


def rollout_metrics(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | float]:
    """The numbers every RL stage logs about its samples: mean and spread of the rewards, length."""
    rewards = batch["rewards"]
    return {"reward": rewards.mean(), "reward_std": rewards.std() if rewards.numel() > 1 else 0.0,
            "completion_length": batch["completion_lengths"].mean()}


def tool_totals(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tool counts of an agentic batch (tool_calls, valid_calls, invalid_calls, tool_errors,
    timeouts), for a stage's metrics; {} for a batch without tools."""
    return {name: batch[name] for name in TOOL_COUNTS if name in batch}


TOOL_COUNTS = ("tool_calls", "valid_calls", "invalid_calls", "tool_errors", "timeouts")


def sample_seed(seed: int, *position: int) -> int:
    """A sampling seed that is a pure function of the run's seed and the position in training."""
    return int(np.random.SeedSequence([seed, *position]).generate_state(1)[0])


def sample_completions(model: Transformer, prompt_ids: Sequence[int], params: SamplingParams,
                       vocab_size: int, stop_ids: Sequence[int]) -> list[list[int]]:
    """`params.num_samples` completions of one prompt via acornlm's batched generation.

    A completion that stopped on its own ends with <|im_end|>, so training also teaches when to
    stop; one cut at max_new_tokens ends without it.
    """
    completions: list[list[int]] = [[] for _ in range(params.num_samples)]
    stopped = [False] * params.num_samples
    for step_tokens in generate_batch(model, prompt_ids, params, eos_ids=stop_ids, vocab_size=vocab_size):
        for row, token in enumerate(step_tokens):
            if token is None:
                stopped[row] = True
            elif not stopped[row]:
                completions[row].append(token)
    return [ids + [IM_END_ID] if done else ids for ids, done in zip(completions, stopped)]


def rl_prompts(data: str | Path | Sequence[str | Path] | None, tasks: str | None, num_prompts: int,
               val_data: str | Path | Sequence[str | Path] | None, val_fraction: float,
               seed: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]], str]:
    """(train prompts, validation prompts, a line describing them) from files or synthetic tasks."""
    if data is not None:
        records = load_prompt_records(as_path_list(data))
        if val_data is not None:
            return records, load_prompt_records(as_path_list(val_data)), f"{len(records):,} prompts from {data}"
        train, val = split_conversations(records, val_fraction, seed)  # any sequence splits the same way
        return train, val or train, f"{len(train):,} prompts from {data} (+{len(val):,} held out)"
    if tasks is None:
        raise ConfigError("--data is required (prompts as .jsonl: {\"prompt\": ..., \"answer\": ...}), or --tasks "
                          "for synthetic prompts rewarded by their checkers")
    train = task_prompt_records(tasks, num_prompts, seed, "train")
    val = task_prompt_records(tasks, max(num_prompts // 10, 16), seed, "heldout")
    return train, val, f"{len(train):,} synthetic prompts from tasks {tasks} (+{len(val):,} held out)"


def reward_spec(spec: str | None, reward_model: str | Path | None) -> str | None:
    """The reward functions to run: those named, or without a name "task" (the synthetic tasks'
    checkers) unless a reward model is given, which is then the only reward."""
    if spec is not None:
        return spec
    return None if reward_model is not None else "task"


def reward_runner(spec: str | None) -> tuple[RewardRunner | None, list[str]]:
    """The runner of the reward functions named in `spec` (None when there are none), and their names."""
    functions, names = load_reward_functions(spec) if spec is not None else ([], [])
    return (RewardRunner(functions, names) if functions else None), names


def stage_reward_model(stage: str, reward_model: str | Path | None, tokenizer: Tokenizer, device: torch.device | str,
                       names: Sequence[str], description: str, context: DistributedContext) -> RewardModel | None:
    """The checked reward model of an RL stage (None without one), after logging what the stage trains on."""
    scorer = load_checked_reward_model(reward_model, tokenizer, device) if reward_model else None
    reward_names = [*names, *([f"reward model {reward_model}"] if reward_model else [])]
    log(f"{stage} data: {description}; rewards: {', '.join(reward_names)}", context)
    return scorer


def data_label(data: str | Path | Sequence[str | Path] | None, tasks: str | None) -> list[str] | str:
    """What config.json records as a stage's data: the files, or the synthetic tasks."""
    return [str(p) for p in as_path_list(data)] if data is not None else f"tasks:{tasks}"


def load_checked_reward_model(path: str | Path, tokenizer: Tokenizer,
                              device: torch.device | str = "cpu") -> RewardModel:
    """The reward model of `path`, after checking it reads the policy's tokens (ConfigError if not):
    it scores the policy's token ids as they are, so both must share one tokenizer."""
    check_reward_tokenizer(path, tokenizer)
    return load_reward_model(path, device=device)


def reference_logprobs(reference: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """log pi_ref of every target token, from a frozen reference (moved to the batch's device once)."""
    device = batch["input_ids"].device
    if reference.lm_head.weight.device != device:
        reference.to(device)
    with torch.no_grad():
        return token_logprobs(reference(batch["input_ids"]), batch["targets"])


def task_accuracy(records: Sequence[dict[str, Any]], texts: Sequence[str]) -> float | None:
    """Share of answers the synthetic tasks' checkers accept, or None when a record is no task prompt."""
    if not all(r.get("task") in {*TASKS, *AGENT_TASKS} and isinstance(r.get("answer"), str) for r in records):
        return None
    return sum(task_reward(text, record) for text, record in zip(texts, records)) / len(records)


class Rollouts:
    """The Trainer's batch source for online RL: samples completions with the current policy, scores them.

    `rollout(step, micro_step)` (also `batch`) picks `batch_size` prompts (a pure function of the
    step), samples `num_samples` completions of each from `model` (the very object the Trainer
    trains) with a seed derived from (seed, step, micro_step, rank, slot), rewards them and returns
    input_ids / targets / mask [prompts x num_samples, longest - 1] (mask = 1 on completion tokens)
    with "rewards" [N], "completion_lengths" [N] and "reward_errors" (a count).
    `eval_batch(i)` answers held-out prompts greedily and returns their rewards ("eval_rewards"),
    and "eval_task_accuracy" when the prompts are synthetic tasks.
    """

    def __init__(self, model: Transformer, tokenizer: Tokenizer, train: Sequence[dict[str, Any]],
                 val: Sequence[dict[str, Any]], rewards: RewardRunner | None, *, num_samples: int, batch_size: int,
                 max_new_tokens: int, temperature: float, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                 seq_len: int | None = None, rank: int = 0, world_size: int = 1, grad_accum_steps: int = 1,
                 reward_model: RewardModel | None = None, stage: str = "rl",
                 environment: ToolEnvironment | None = None) -> None:
        if rewards is None and reward_model is None:
            raise ConfigError(f"{stage} needs a reward: reward functions, a reward model, or both")
        self.environment = environment
        with_tools = [r for r in [*train, *val] if r.get("tools")]
        if with_tools and environment is None:
            raise ConfigError(f"{len(with_tools)} prompts carry tools but no function runs them: give --tools "
                              "FILE.py (a Python file whose functions are the tools)")
        self.model, self.tokenizer, self.rewards, self.reward_model = model, tokenizer, rewards, reward_model
        self.stage = stage
        self.seq_len = seq_len or model.config.max_position_embeddings
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.rank, self.world_size, self.grad_accum_steps = rank, world_size, grad_accum_steps
        self.sampling = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_k": top_k,
                         "top_p": top_p}
        SamplingParams(**self.sampling)  # validate now, not at the first step
        self.stop_ids = (IM_END_ID, tokenizer.eot_id)
        self.train, self.train_ids = self._fitting(train, "training")
        self.val, self.val_ids = self._fitting(val, "validation")
        mean_prompt = sum(map(len, self.train_ids)) / len(self.train_ids)
        self.tokens_per_step = round((mean_prompt + max_new_tokens) * num_samples * batch_size
                                     * grad_accum_steps * world_size)

    def _fitting(self, records: Sequence[dict[str, Any]], split: str) -> tuple[list[dict[str, Any]], list[list[int]]]:
        """The records whose prompt leaves room for max_new_tokens within train.seq_len, and their ids.

        A row is prompt + completion minus its last token, so prompt + max_new_tokens <= seq_len + 1.
        """
        budget = self.seq_len + 1 - self.sampling["max_new_tokens"]
        kept, ids = [], []
        for record in records:
            prompt_ids = render_prompt(self.tokenizer, record["messages"], tools=record.get("tools"),
                                       enable_thinking=record.get("enable_thinking"))
            if len(prompt_ids) <= budget:
                kept.append(record)
                ids.append(prompt_ids)
        if not kept:
            raise ConfigError(f"no {split} prompt fits train.seq_len={self.seq_len} with --max_new_tokens "
                              f"{self.sampling['max_new_tokens']}; raise train.seq_len or lower --max_new_tokens")
        if len(kept) < len(records):
            log(f"{self.stage}: dropped {len(records) - len(kept)} of {len(records)} {split} prompts longer than "
                f"{budget} tokens (train.seq_len + 1 - max_new_tokens)", DistributedContext(self.rank, self.world_size))
        return kept, ids

    def _generate(self, prompt_ids: list[int], params: SamplingParams) -> list[list[int]]:
        was_training = self.model.training
        self.model.eval()  # no dropout while sampling
        try:
            return sample_completions(self.model, prompt_ids, params, self.tokenizer.vocab_size, self.stop_ids)
        finally:
            self.model.train(was_training)

    def _text(self, completion: list[int]) -> str:
        return self.tokenizer.decode([t for t in completion if t != IM_END_ID])

    def _play(self, index: int, records: Sequence[dict[str, Any]], prompt_ids: list[int],
              params: SamplingParams) -> list[Trajectory]:
        """Trajectories of one prompt that carries tools: the model and the tools take turns."""
        record, environment = records[index], self.environment
        return rollout_group(self.model, self.tokenizer, record["messages"], tools=record["tools"],
                             functions=environment.functions, params=params, max_turns=environment.max_turns,
                             enable_thinking=record.get("enable_thinking"), example=record,
                             timeout_s=environment.timeout_s, max_total_tokens=self.seq_len + 1)

    def _samples(self, records: Sequence[dict[str, Any]], ids: Sequence[list[int]], index: int,
                 params: SamplingParams) -> list[tuple[list[int], list[int], str, dict[str, int]]]:
        """(completion ids, sampled mask, answer text, tool counts) of each sample of one prompt."""
        record = records[index]
        if record.get("tools"):
            was_training = self.model.training
            try:
                group = self._play(index, records, ids[index], params)
            finally:
                self.model.train(was_training)
            return [(t.ids[t.prompt_length:], t.generated[t.prompt_length:], t.reply.content, t.stats)
                    for t in group]
        return [(c, [1] * len(c), answer_text(self._text(c), record), {}) for c in self._generate(ids[index], params)]

    def score(self, prompts: Sequence[list[int]], completions: Sequence[list[int]],
              records: Sequence[dict[str, Any]], answers: Sequence[str] | None = None) -> torch.Tensor:
        """Each completion's reward [N]: the reward functions' sum on its answer (`answers`, or the text
        after any think block) plus the reward model's score of prompt + completion (token ids as
        sampled, <|im_end|> included when it stopped; tool responses included in a trajectory)."""
        total = torch.zeros(len(completions), dtype=torch.float32)
        if self.rewards is not None:
            texts = answers if answers is not None else [answer_text(self._text(c), r)
                                                         for c, r in zip(completions, records)]
            total += torch.tensor([self.rewards.score(text, record) for text, record in zip(texts, records)],
                                  dtype=torch.float32)
        if self.reward_model is not None:
            sequences = [list(prompt) + list(completion) for prompt, completion in zip(prompts, completions)]
            total += self.reward_model.score_texts(self.tokenizer, sequences).detach().float().cpu()
        return total

    def rollout(self, step: int, micro_step: int) -> dict[str, torch.Tensor]:
        indices = example_indices(len(self.train), self.seed, step, micro_step, self.batch_size, self.rank,
                                  self.world_size, self.grad_accum_steps)
        errors_before = self.rewards.errors if self.rewards is not None else 0
        prompts, completions, masks, answers, records = [], [], [], [], []
        counts = dict.fromkeys(TOOL_COUNTS, 0)
        for slot, index in enumerate(indices):
            params = SamplingParams(**self.sampling, num_samples=self.num_samples,
                                    seed=sample_seed(self.seed, step, micro_step, self.rank, slot))
            for completion, sampled, answer, stats in self._samples(self.train, self.train_ids, index, params):
                prompts.append(self.train_ids[index])
                completions.append(completion)
                masks.append(sampled)
                answers.append(answer)
                records.append(self.train[index])
                for name in counts:
                    counts[name] += stats.get(name, 0)
        rewards = self.score(prompts, completions, records, answers)
        batch = collate_sequences([p + c for p, c in zip(prompts, completions)],
                                  [[0] * len(p) + m for p, m in zip(prompts, masks)], self.tokenizer.eot_id)
        batch["rewards"] = rewards
        errors = (self.rewards.errors if self.rewards is not None else 0) - errors_before
        batch["reward_errors"] = torch.tensor(float(errors))
        batch["completion_lengths"] = torch.tensor([sum(m) for m in masks], dtype=torch.float32)
        if self.environment is not None:
            batch.update({name: torch.tensor(float(value)) for name, value in counts.items()})
        return batch

    def batch(self, step: int, micro_step: int) -> dict[str, torch.Tensor]:
        return self.rollout(step, micro_step)

    def eval_batch(self, index: int) -> dict[str, torch.Tensor]:
        params = SamplingParams(**{**self.sampling, "temperature": 0.0})
        positions = [(index * self.batch_size + i) % len(self.val) for i in range(self.batch_size)]
        samples = [self._samples(self.val, self.val_ids, p, params)[0] for p in positions]
        records = [self.val[p] for p in positions]
        answers = [answer for _, _, answer, _ in samples]
        batch = {"eval_rewards": self.score([self.val_ids[p] for p in positions], [c for c, _, _, _ in samples],
                                            records, answers)}
        accuracy = task_accuracy(records, answers)
        if accuracy is not None:
            batch["eval_task_accuracy"] = torch.tensor(accuracy)
        return batch
