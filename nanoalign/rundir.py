"""A run's folder (out_dir): who may write it, and what a rerun or a resume finds there.

- `claim` refuses a folder that already holds a run (ckpt.pt or metrics.jsonl) unless the run resumes it or was
  told to overwrite it, refuses --resume without a checkpoint, and takes out_dir/.lock for the run's life. The lock
  is an flock: the OS releases it when the process dies, so the lock of a killed run never blocks the next one,
  and a second live run on the same folder stops at once with the first one's pid.
- `check_resumable` compares the checkpoint with the run about to continue it (algorithm, model shape,
  tokenizer) and names what differs.
- `trim_metrics` cuts metrics.jsonl back to the checkpoint's step, so a resumed run logs each step once.
The guarantees, with the commands that show them: docs/reliability.md.
"""
import fcntl
import json
import os
from pathlib import Path

from nanoalign.config import ConfigError


def claim(out_dir, resume, overwrite):
    """Check that this run may write out_dir, then lock it; returns the open lock file (keep it open)."""
    out_dir = Path(out_dir)
    ckpt, metrics = out_dir / "ckpt.pt", out_dir / "metrics.jsonl"
    if resume and not ckpt.exists():
        raise ConfigError(f"--resume: there is no checkpoint {ckpt} to resume")
    if not resume and not overwrite and (ckpt.exists() or metrics.exists()):
        held = "ckpt.pt" if ckpt.exists() else "metrics.jsonl"
        raise ConfigError(f"{out_dir} already holds a run ({held}): pass --resume to continue it, --overwrite to "
                          "start it again from scratch, or another --out_dir")
    out_dir.mkdir(parents=True, exist_ok=True)
    lock = open(out_dir / ".lock", "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "unknown"
        lock.close()
        raise ConfigError(f"{out_dir} is in use by another run (pid {holder}); wait for it or pick another "
                          "--out_dir") from None
    lock.seek(0)
    lock.truncate()
    lock.write(str(os.getpid()))
    lock.flush()
    return lock


def check_resumable(ckpt, algo, model_config, tokenizer_spec):
    """Raise ConfigError naming every difference between a checkpoint and the run that would continue it."""
    saved = {"algorithm": ckpt.get("algo", ckpt.get("config", {}).get("algo")), "tokenizer": ckpt.get("tokenizer")}
    now = {"algorithm": algo, "tokenizer": tokenizer_spec}
    differ = [f"{k}: checkpoint {saved[k]!r}, this run {now[k]!r}" for k in saved if saved[k] != now[k]]
    shape = ckpt.get("model_config", {})
    differ += [f"model {k}: checkpoint {shape.get(k)!r}, this run {v!r}" for k, v in model_config.items()
               if k in shape and shape[k] != v and k != "dropout"]  # dropout is the run's choice, not the shape
    if differ:
        raise ConfigError("cannot resume: the checkpoint was made by another run (" + "; ".join(differ) + ")")


def trim_metrics(path, step):
    """Keep the rows of metrics.jsonl up to `step` (and drop a half-written last line)."""
    path = Path(path)
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut by the crash
            continue
        if row.get("step", 0) <= step:
            kept.append(line)
    path.write_text("".join(line + "\n" for line in kept))
