"""The algorithm registry: `--algo=<name>` -> the Algorithm class in nanoalign/algos/<module>.py.

A variant is an existing algorithm with other defaults (e.g. ipo = DPO with loss_type="ipo"); the command line
still overrides them: `algo_config(name)` is the algorithm's Config dataclass with the variant's defaults, what
config.load_config takes as `algo_configs`. Adding algos/mine.py means adding one line here.
"""
import dataclasses
import functools
import importlib
import typing

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
    "pro": ("pro:PRO", {}),
    "rrhf": ("rrhf:RRHF", {}),
    "lipo": ("lipo:LiPO", {}),
    "npo": ("npo:NPO", {}),
    "tdpo": ("tdpo:TDPO", {}),
    "dro": ("dro:DRO", {}),
    "cringe": ("cringe:CRINGE", {}),
    "sdpo": ("sdpo:SDPO", {}),
    "sppo": ("sppo:SPPO", {}),
    "self_reward": ("self_reward:SelfReward", {}),
}


def get_algorithm(name):
    if name not in ALGORITHMS:
        raise ValueError(f"unknown algo {name!r}; choose from {', '.join(sorted(ALGORITHMS))}")
    target, _ = ALGORITHMS[name]
    module, cls = target.split(":")
    return getattr(importlib.import_module(f"nanoalign.algos.{module}"), cls)


@functools.cache  # one class per name, so configs built twice compare equal
def algo_config(name):
    """The Config dataclass of `--algo=name` (None if it has no keys of its own), defaults as the variant sets them."""
    config = get_algorithm(name).Config
    defaults = ALGORITHMS[name][1]
    if not defaults:
        return config
    hints = typing.get_type_hints(config, include_extras=True)  # keeps each key's Range
    fields = [(key, hints[key], dataclasses.field(default=value)) for key, value in defaults.items()]
    return dataclasses.make_dataclass(f"{config.__name__}_{name}", fields, bases=(config,))
