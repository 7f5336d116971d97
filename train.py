"""Train with any algorithm: python train.py [preset.toml] [--key=value ...]   (--help lists every key)

    python train.py                                   # DPO on the built-in toy world (builds what is missing)
    python train.py --algo=sft --data=sft.jsonl --init_from=scratch
    torchrun --standalone --nproc_per_node=2 train.py --algo=dpo
Every key and its default: nanoalign/config.py (TrainConfig) and the algorithm's Config in nanoalign/algos/.
"""
import dataclasses
import sys

import torch.distributed as dist

from nanoalign.algos import algo_config, get_algorithm
from nanoalign.config import ConfigError, help_text, load_config
from nanoalign.data import DataError
from nanoalign.toy.pipeline import toy_run  # importing the toy world registers "toy" and "gold"
from nanoalign.trainer import train


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if "--help" in argv or "-h" in argv:
        rest = [a for a in argv if a not in ("--help", "-h")]
        algo = load_config([a for a in rest if a.startswith("--algo=")] or [], algo_config).algo
        print(__doc__ + help_text(algo, algo_config(algo)))
        return None
    cfg = load_config(argv, algo_config)
    if not cfg.data:  # the built-in default: build (or reuse) the toy world's models and data, train, evaluate
        out_dir = toy_run(cfg)
    elif not cfg.init_from:
        raise SystemExit("--data was given without --init_from: pass scratch, ckpt:<dir> or hf:<dir>")
    else:
        out_dir = train(dataclasses.replace(cfg, out_dir=cfg.out_dir or f"out/{cfg.algo}"), get_algorithm(cfg.algo))
    if dist.is_initialized():
        dist.destroy_process_group()
    return out_dir


if __name__ == "__main__":
    try:
        main()
    except (ConfigError, DataError, FileNotFoundError, FileExistsError) as err:  # the user's input, not a bug: one line, exit 2
        print(f"train.py: error: {err}", file=sys.stderr)
        sys.exit(2)
