"""Training: one generic loop (`trainer.Trainer`) and the stages that feed it.

    config.py         TrainConfig: every knob of a run
    trainer.py        the loop: accumulation, clipping, schedule, eval, metrics, checkpoints, DDP, NaN skips
    pretrain.py       the pretraining stage: TokenLoader batches + next-token cross-entropy
    optim.py          AdamW with weight decay on matrices only
    schedule.py       linear warmup + cosine decay
    precision.py      device and dtype selection (autocast, GradScaler)
    distributed.py    torchrun / process group helpers
    checkpointing.py  atomic checkpoints, `latest` / `best` pointers, train_state.pt
    signals.py        Ctrl-C / SIGTERM: finish the step, save, exit (StopOnSignal)
    metrics.py        metrics.jsonl, TensorBoard / wandb / SwanLab, the loss-curve PNG
    mfu.py            model FLOPs utilisation against a measured matmul peak
    gpu_stats.py      on a GPU: peak memory per metrics line, MFU against the bf16 spec peak
    losses.py         the shared losses, each named by its formula
    stage.py          what every fine-tuning stage stands on (start, policy, reference, metrics)
    sft.py, dpo.py, distill.py                 the supervised and preference stages
    reward_model.py, reward.py                 a scalar-head reward model and its Bradley-Terry stage
    rollouts.py, rewards.py, grpo.py, ppo.py   online RL: sampling (with tools), rewards, GRPO and PPO

A new stage supplies a batch source and a loss function and reuses the Trainer.
"""

from acornlm.train.config import TrainConfig

__all__ = ["TrainConfig"]
