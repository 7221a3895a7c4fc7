"""LoRA (Hu et al. 2021): fine-tune a few low-rank matrices instead of the whole model.

Interface (used by the SFT, DPO, GRPO and distillation stages and by `acornlm lora merge`):

    from acornlm.model.lora import LoraConfig, apply_lora, save_adapter, load_model_with_adapter, merge_lora

    wrapped = apply_lora(model, LoraConfig(rank=8, alpha=16, targets="q_proj,v_proj"))  # freezes the rest
    save_adapter(model, "out/", base_model_name_or_path="runs/pretrain")  # PEFT files
    model, info = load_model_with_adapter("runs/sft-lora")  # base weights + adapter, if the dir has one
    merge_lora(model)                                        # fold B A into W; plain Linear layers again
    write_lora_checkpoint                                    # the Trainer's `write_model` for LoRA runs

Each targeted linear layer y = W x + b becomes

    y = W x + b + (alpha / r) * B A dropout(x)        A: [r, in], B: [out, r]

with W and b frozen, A drawn like PEFT's default (Kaiming-uniform) and B = 0, so training starts
from exactly the base model's function. Targets are module-name suffixes (`q_proj`, `down_proj`,
...); non-square layers (gate/up/down) work like the others; "all" means every linear layer inside
the Transformer blocks. A LoRA checkpoint folder holds the *base* weights in model.safetensors
(loadable by everything) plus the adapter in the PEFT layout:

    adapter_model.safetensors   base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight, ...
    adapter_config.json         {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r", "lora_alpha", ...}

so `peft.PeftModel.from_pretrained(hf_model, folder)` loads it onto the Hugging Face export.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from acornlm.errors import CheckpointError, ConfigError
from acornlm.model.checkpoint import load_model, resolve_checkpoint, write_model_files
from acornlm.model.transformer import Transformer

ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"
PEFT_PREFIX = "base_model.model."  # PEFT's name for the wrapped model inside PeftModel
ALL_TARGETS = "all"


@dataclass
class LoraConfig:
    """Low-rank adapters instead of full fine-tuning.

    Args:
        rank: LoRA rank r (the width of A and B); 0 = no LoRA, train every weight.
        alpha: Scale numerator: the adapter's output is multiplied by alpha / rank.
        dropout: Dropout on the adapter's input during training.
        targets: Comma-separated module-name suffixes to adapt, e.g. q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj; "all" = every linear layer in the Transformer blocks.
    """

    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    targets: str = ALL_TARGETS

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank < 0:
            raise ConfigError(f"lora.rank must be an integer >= 0 (0 = no LoRA), got {self.rank!r}")
        if self.alpha <= 0:
            raise ConfigError(f"lora.alpha must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if not self.target_list():
            raise ConfigError('lora.targets is empty: name module suffixes such as q_proj,v_proj, or "all"')

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def target_list(self) -> list[str]:
        targets = self.targets if isinstance(self.targets, str) else ",".join(self.targets)
        return [name.strip() for name in targets.split(",") if name.strip()]

    def to_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "alpha": self.alpha, "dropout": self.dropout, "targets": self.targets}


class LoraLinear(nn.Linear):
    """A frozen linear layer plus a trainable low-rank update: y = W x + b + (alpha/r) B A dropout(x).

    It *is* a Linear holding the base layer's own weight and bias, so the base keeps its parameter
    names (`q_proj.weight`) and the adapter adds `q_proj.lora_A.weight` and `q_proj.lora_B.weight`.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float) -> None:
        nn.Module.__init__(self)  # take over base's tensors instead of allocating new ones
        self.in_features, self.out_features = base.in_features, base.out_features
        self.register_parameter("weight", base.weight)
        self.register_parameter("bias", base.bias)  # None when the layer has no bias
        self.rank, self.scaling = rank, alpha / rank
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, **factory)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, **factory)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # as PEFT: A random, B zero
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = self.lora_B(self.lora_A(self.lora_dropout(x)))
        return torch.add(super().forward(x), update, alpha=self.scaling)  # no scaled copy of the update

    def delta_weight(self) -> torch.Tensor:
        """The update LoRA adds to W: (alpha/r) B A, computed in float64 so merging loses no precision."""
        delta = self.lora_B.weight.double() @ self.lora_A.weight.double()
        return (delta * self.scaling).to(self.weight.dtype)


# --- applying ---

def linear_layer_names(model: nn.Module) -> list[str]:
    """Names of every linear layer of the model (the candidates for LoRA)."""
    return [name for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and ".lora_" not in name]


def find_targets(model: Transformer, targets: list[str]) -> list[str]:
    """The linear layers whose names end with one of `targets` ("all": every linear layer in the blocks).

    ConfigError when a target matches nothing, listing the suffixes that exist.
    """
    names = linear_layer_names(model)
    if targets == [ALL_TARGETS]:
        return [name for name in names if name.startswith("model.layers.")]
    unmatched = [t for t in targets if not any(name == t or name.endswith("." + t) for name in names)]
    if unmatched:
        suffixes = sorted({name.rsplit(".", 1)[-1] for name in names})
        raise ConfigError(f"lora.targets {', '.join(unmatched)} match no linear layer of this model; "
                          f"its linear layers are named {', '.join(suffixes)} (e.g. {names[0]}), or use \"all\"")
    return [name for name in names if any(name == t or name.endswith("." + t) for t in targets)]


def apply_lora(model: Transformer, config: LoraConfig) -> list[str]:
    """Wrap the targeted layers in LoraLinear and freeze every other parameter; returns the wrapped names."""
    if not config.enabled:
        raise ConfigError("lora.rank is 0: LoRA is off; set --lora.rank to a positive integer")
    if lora_layers(model):
        raise ConfigError("the model already has LoRA adapters; merge them first (acornlm lora merge)")
    names = find_targets(model, config.target_list())
    if "lm_head" in names and model.config.tie_word_embeddings:
        raise ConfigError("lm_head shares its matrix with the input embedding (tie_word_embeddings), so a LoRA "
                          "update on it could not be merged; leave lm_head out of lora.targets")
    model.requires_grad_(False)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoraLinear(getattr(parent, child), config.rank, config.alpha, config.dropout))
    model.lora_config = config  # remembered for saving
    return names


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    return {name: module for name, module in model.named_modules() if isinstance(module, LoraLinear)}


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters, a tied matrix counted once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


# --- saving and loading ---

def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights under PEFT's names (base_model.model.<module>.lora_A.weight, ...)."""
    return {PEFT_PREFIX + name: tensor.detach().contiguous()
            for name, tensor in model.state_dict().items() if ".lora_" in name}


def peft_adapter_config(model: Transformer, base_model_name_or_path: str | None) -> dict[str, Any]:
    """adapter_config.json in PEFT's layout (the fields peft.LoraConfig reads)."""
    config: LoraConfig = model.lora_config
    suffixes = sorted({name.rsplit(".", 1)[-1] for name in lora_layers(model)})
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": config.rank, "lora_alpha": config.alpha, "lora_dropout": config.dropout,
        "target_modules": suffixes, "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
        "init_lora_weights": True, "use_rslora": False, "use_dora": False, "modules_to_save": None,
    }


def save_adapter(model: Transformer, directory: str | Path, base_model_name_or_path: str | None = None) -> None:
    """Write adapter_model.safetensors and adapter_config.json (PEFT layout) into `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(adapter_state_dict(model), str(directory / ADAPTER_WEIGHTS_FILE), metadata={"format": "pt"})
    config = peft_adapter_config(model, base_model_name_or_path)
    (directory / ADAPTER_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def read_adapter_config(directory: str | Path) -> LoraConfig:
    """The LoraConfig of a saved adapter (our files or PEFT's)."""
    file = Path(directory) / ADAPTER_CONFIG_FILE
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
        targets = data["target_modules"]
        return LoraConfig(rank=int(data["r"]), alpha=float(data["lora_alpha"]),
                          dropout=float(data.get("lora_dropout", 0.0)),
                          targets=targets if isinstance(targets, str) else ",".join(targets))
    except FileNotFoundError as exc:
        raise CheckpointError(f"{file} is missing") from exc
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{file} is not a LoRA adapter config: {exc}") from exc


def load_adapter(model: Transformer, directory: str | Path) -> list[str]:
    """Apply the adapter saved in `directory` to `model` (wrap + load A and B); returns the wrapped names."""
    directory = Path(directory)
    config = read_adapter_config(directory)
    try:
        names = apply_lora(model, config)
    except ConfigError as exc:
        raise CheckpointError(f"the adapter in {directory} does not fit this model: {exc}") from exc
    file = directory / ADAPTER_WEIGHTS_FILE
    try:
        saved = load_file(str(file), device=str(model.lm_head.weight.device))
    except FileNotFoundError as exc:
        raise CheckpointError(f"{file} is missing") from exc
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise CheckpointError(f"{file} is corrupt or unreadable: {exc}") from exc
    expected = adapter_state_dict(model)
    if saved.keys() != expected.keys():
        missing, unexpected = sorted(expected.keys() - saved.keys()), sorted(saved.keys() - expected.keys())
        raise CheckpointError(f"{file} does not match {ADAPTER_CONFIG_FILE}: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}")
    state = {name.removeprefix(PEFT_PREFIX): tensor for name, tensor in saved.items()}
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shapes
        raise CheckpointError(f"{file} does not fit this model: {exc}") from exc
    model.requires_grad_(False)  # loaded for inference; a training stage re-enables the adapters
    return names


def enable_adapter_training(model: nn.Module) -> None:
    """Make exactly the LoRA matrices trainable (after `load_adapter`, to continue training)."""
    model.requires_grad_(False)
    for layer in lora_layers(model).values():
        layer.lora_A.weight.requires_grad_(True)
        layer.lora_B.weight.requires_grad_(True)


def base_model_view(model: Transformer) -> Transformer:
    """A plain Transformer sharing the LoRA model's base tensors (no copy): what model.safetensors holds."""
    with torch.device("meta"):
        base = Transformer(model.config)
    state = {name: tensor for name, tensor in model.state_dict().items() if ".lora_" not in name}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    base.load_state_dict(state, strict=False, assign=True)
    if model.config.tie_word_embeddings:
        base.lm_head.weight = base.model.embed_tokens.weight
    return base


def write_lora_checkpoint(directory: Path, model: Transformer, info: dict[str, Any] | None = None,
                          tokenizer_dir: str | Path | None = None) -> None:
    """The Trainer's `write_model` for LoRA runs: base weights + config + tokenizer, and the adapter."""
    write_model_files(directory, base_model_view(model), info=info, tokenizer_dir=tokenizer_dir)
    base = (info or {}).get("init")
    save_adapter(model, directory, base_model_name_or_path=str(base) if base else None)


def load_model_with_adapter(path: str | Path, device: str | torch.device = "cpu",
                            dtype: torch.dtype | None = None) -> tuple[Transformer, dict[str, Any]]:
    """`checkpoint.load_model`, plus the LoRA adapter when the checkpoint folder holds one (unmerged)."""
    ckpt = resolve_checkpoint(path)
    model, info = load_model(ckpt, device=device, dtype=dtype)
    if (ckpt / ADAPTER_CONFIG_FILE).is_file():
        load_adapter(model, ckpt)
        model.eval()
    return model, info


# --- merging ---

@torch.no_grad()
def merge_lora(model: Transformer) -> Transformer:
    """Fold every adapter into its base weight (W <- W + (alpha/r) B A) and unwrap it, in place.

    The merged model computes the same function as the adapted one (up to float rounding) with
    no extra cost per token, and saves as an ordinary checkpoint.
    """
    for name, layer in lora_layers(model).items():
        layer.weight += layer.delta_weight()
        plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        plain.weight, plain.bias = layer.weight, layer.bias
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, plain)
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model
