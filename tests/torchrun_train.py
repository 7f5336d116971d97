"""The tests' torchrun entry point: train.py's run of an explicit --data, plus `--stop_after=N` (trainer.train's
stop_after: the run stops after step N as if interrupted, with its checkpoint), which the resume tests need."""
import sys

import torch.distributed as dist

import nanoalign.toy  # noqa: F401  registers the "gold" reward, as train.py's import of the toy world does
from nanoalign.algos import algo_config, get_algorithm
from nanoalign.config import load_config
from nanoalign.trainer import train

if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--stop_after=")]
    stop = [int(a.split("=", 1)[1]) for a in sys.argv[1:] if a.startswith("--stop_after=")]
    cfg = load_config(args, algo_config)
    train(cfg, get_algorithm(cfg.algo), stop_after=stop[0] if stop else None)
    dist.destroy_process_group()
