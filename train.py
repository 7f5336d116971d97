"""Train with any algorithm: python train.py [preset.toml] [--key=value ...]

    python train.py                                   # DPO on the built-in toy world (builds what is missing)
    python train.py --algo=sft --data=sft.jsonl --init_from=scratch
    torchrun --standalone --nproc_per_node=2 train.py --algo=dpo
Every key and its default: nanoalign/config.py (TrainConfig) and the algorithm's Config in nanoalign/algos/.
"""
import sys

import torch.distributed as dist

from nanoalign.algos import get_algorithm, variant_defaults
from nanoalign.config import load_config
from nanoalign.toy.pipeline import evaluate_run, prepare  # importing the toy world registers "toy" and "gold"
from nanoalign.trainer import train


def algo_config(name):
    return get_algorithm(name).Config


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    algo = load_config(argv, algo_config).algo  # first pass: which algorithm (and so which variant defaults)
    cfg = load_config(argv, algo_config, overrides=variant_defaults(algo))
    algorithm = get_algorithm(cfg.algo)
    toy_world = not cfg.data
    if toy_world:  # the built-in default: build (or reuse) the toy world's models and data
        prepare(cfg, algorithm)
    elif not cfg.init_from:
        raise SystemExit("--data was given without --init_from: pass scratch, ckpt:<dir> or hf:<dir>")
    cfg.out_dir = cfg.out_dir or f"out/{cfg.algo}"
    out_dir = train(cfg, algorithm)
    if toy_world:
        evaluate_run(cfg, out_dir)
    if dist.is_initialized():
        dist.destroy_process_group()
    return out_dir


if __name__ == "__main__":
    main()
