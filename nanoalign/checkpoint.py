"""The one checkpoint format: a single `ckpt.pt` per run, written atomically, loaded with weights_only=True.
This file is the format only; nanoalign/loading.py turns a checkpoint into a model.

Keys: model (state dict of the trained module), model_config (GPTConfig fields), tokenizer (spec string),
kind ("policy" | "reward" | ...), policy_prefix (where the policy's weights sit inside `model`),
optimizer, step, rng, config (the resolved run config), plus whatever the algorithm adds.
"""
import os
from pathlib import Path

import torch


def checkpoint_path(spec):
    path = Path(str(spec).removeprefix("ckpt:"))
    return path / "ckpt.pt" if path.is_dir() else path


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def save_checkpoint(path, **state):
    """Write to a temp file of this process's own, fsync it, rename it over `path`, fsync the folder: a crash or a
    power cut mid-write leaves the previous ckpt.pt whole, and two writers never share a temp file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    for stale in path.parent.glob(f"{path.name}.*.tmp"):  # left by a writer killed mid-write (kill -9)
        pid = stale.name[len(path.name) + 1:].split(".")[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            stale.unlink(missing_ok=True)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)  # the rename itself reaches the disk
    finally:
        os.close(folder)


def load_checkpoint(spec, device="cpu"):
    path = checkpoint_path(spec)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    return torch.load(path, map_location=device, weights_only=True)


def policy_state(ckpt):
    """The policy's weights inside a checkpoint (an actor-critic run stores them under a prefix)."""
    prefix = ckpt.get("policy_prefix", "")
    return {k[len(prefix):]: v for k, v in ckpt["model"].items() if k.startswith(prefix)}
