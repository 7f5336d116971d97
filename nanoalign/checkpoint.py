"""The one checkpoint format: a single `ckpt.pt` per run, written atomically, loaded with weights_only=True.

Keys: model (state dict of the trained module), model_config (GPTConfig fields), tokenizer (spec string),
kind ("policy" | "reward" | ...), policy_prefix (where the policy's weights sit inside `model`),
optimizer, step, rng, config (the resolved run config), plus whatever the algorithm adds.
"""
import os
from dataclasses import asdict
from pathlib import Path

import torch

from nanoalign.model import GPT, GPTConfig
from nanoalign.tokenizer import get_tokenizer


def checkpoint_path(spec):
    path = Path(str(spec).removeprefix("ckpt:"))
    return path / "ckpt.pt" if path.is_dir() else path


def save_checkpoint(path, **state):
    """Write to a temp file, then rename: a crash mid-write never leaves a truncated ckpt.pt."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(spec, device="cpu"):
    path = checkpoint_path(spec)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    return torch.load(path, map_location=device, weights_only=True)


def policy_state(ckpt):
    """The policy's weights inside a checkpoint (an actor-critic run stores them under a prefix)."""
    prefix = ckpt.get("policy_prefix", "")
    return {k[len(prefix):]: v for k, v in ckpt["model"].items() if k.startswith(prefix)}


def model_from_checkpoint(ckpt, device="cpu"):
    if "lora" in ckpt:  # adapter-only LoRA checkpoint: the base's weights plus the merged adapters (nanoalign/lora.py)
        from nanoalign.lora import merged_state_dict
        ckpt = {**ckpt, "model": merged_state_dict(ckpt)}
    model = GPT(GPTConfig(**ckpt["model_config"]))
    model.load_state_dict(policy_state(ckpt))
    return model.to(device), get_tokenizer(ckpt["tokenizer"])


def load_model(spec, device="cpu", dtype=None):
    """A language model and its tokenizer from "ckpt:<dir or file>", "hf:<dir>" or a bare checkpoint path."""
    if spec.startswith("hf:"):
        from nanoalign.hf import load_hf_model  # optional extra: safetensors
        return load_hf_model(spec[3:], device=device, dtype=dtype)
    ckpt = load_checkpoint(spec, device)
    if ckpt.get("kind", "policy") == "reward":
        raise ValueError(f"{checkpoint_path(spec)} holds a reward model, not a language model")
    return model_from_checkpoint(ckpt, device)


def model_config_dict(model):
    return asdict(model.cfg)
