"""The algorithm registry: `--algo=<name>` -> the Algorithm class in nanoalign/algos/<module>.py.

A variant is an existing algorithm with other defaults (e.g. ipo = DPO with loss_type="ipo"); the command line
still overrides them. Adding algos/mine.py means adding one line here.
"""
import importlib

ALGORITHMS = {
    # name: ("module:Class", defaults of this variant)
    "sft": ("sft:SFT", {}),
}


def get_algorithm(name):
    if name not in ALGORITHMS:
        raise ValueError(f"unknown algo {name!r}; choose from {', '.join(sorted(ALGORITHMS))}")
    target, _ = ALGORITHMS[name]
    module, cls = target.split(":")
    return getattr(importlib.import_module(f"nanoalign.algos.{module}"), cls)


def variant_defaults(name):
    return dict(ALGORITHMS[name][1]) if name in ALGORITHMS else {}
