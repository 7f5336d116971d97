"""The algorithm registry: `--algo=<name>` -> the Algorithm class in nanoalign/algos/<module>.py.

A variant is an existing algorithm with other defaults (e.g. ipo = DPO with loss_type="ipo"); the command line
still overrides them. Adding algos/mine.py means adding one line here.
"""
import importlib

ALGORITHMS = {
    # name: ("module:Class", defaults of this variant)
    "sft": ("sft:SFT", {}),
    "dpo": ("dpo:DPO", {}),
    "ipo": ("dpo:DPO", {"loss_type": "ipo"}),
    "cdpo": ("dpo:DPO", {"label_smoothing": 0.1}),
    "robust": ("dpo:DPO", {"loss_type": "robust", "label_smoothing": 0.1}),
    "hinge": ("dpo:DPO", {"loss_type": "hinge"}),
    "rdpo": ("dpo:DPO", {"loss_type": "rdpo", "rdpo_alpha": 0.01}),
    "dpop": ("dpo:DPO", {"loss_type": "dpop"}),
    "simpo": ("dpo:DPO", {"loss_type": "simpo", "beta": 2.0, "simpo_gamma": 0.5}),
    "cpo": ("dpo:DPO", {"loss_type": "cpo", "rpo_alpha": 1.0}),
    "rpo": ("dpo:DPO", {"rpo_alpha": 1.0}),
    "kto": ("kto:KTO", {}),
    "orpo": ("orpo:ORPO", {}),
    "coh": ("coh:CoH", {}),
    "rm": ("rm:RewardTrainer", {}),
    "ppo": ("ppo:PPO", {}),
    "online_dpo": ("online_dpo:OnlineDPO", {}),
    "rloo": ("rloo:RLOO", {}),
    "grpo": ("grpo:GRPO", {}),
    "raft": ("raft:RAFT", {}),
}


def get_algorithm(name):
    if name not in ALGORITHMS:
        raise ValueError(f"unknown algo {name!r}; choose from {', '.join(sorted(ALGORITHMS))}")
    target, _ = ALGORITHMS[name]
    module, cls = target.split(":")
    return getattr(importlib.import_module(f"nanoalign.algos.{module}"), cls)


def variant_defaults(name):
    return dict(ALGORITHMS[name][1]) if name in ALGORITHMS else {}
