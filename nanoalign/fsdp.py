"""FSDP2 for the one training loop: shard what the optimizer updates, and keep the one checkpoint format.

`--fsdp=true` under torchrun shards the trainable module (the policy, with a critic or value head where the
algorithm has one) with PyTorch's FSDP2 (`torch.distributed.fsdp.fully_shard`): parameters, gradients and AdamW
state are split over the ranks, and each unit's parameters are all-gathered just before its forward.
Units: every transformer block, then every GPT (its embeddings, final norm and head), then the module's root (a
value head, a reward head). A GPT unit stays gathered after its forward (reshard_after_forward=False) because the
fused log-prob head, generate() and PPO's value heads read its head weight after the forward returns; the root's
other entry points (PPO's `values`) are registered as forward methods.
Mixed precision in a bf16 run: parameters are gathered in bf16 and gradients reduced in fp32
(MixedPrecisionPolicy); the fp32 shards stay the master weights. Outside the sharded module nothing changes: the
offline algorithms precompute pi_ref (no second model), an online run's frozen reference and reward model are
replicated no-grad copies in the run's inference dtype, and under LoRA pi_ref is the sharded policy itself with its
adapters off.
Checkpoints: `full_state` gathers the model and optimizer state (torch.distributed.checkpoint.state_dict, full
state dicts) into the same ckpt.pt a single process or DDP writes, optimizer entries numbered as
torch.optim numbers them, so export (python -m nanoalign.hf export), sample.py and resume read it unchanged; on
resume each rank reads the full state and keeps its shards (`load_optimizer_state`). This gathers the whole model
on rank 0's CPU once per save: fine up to a few billion parameters; a model that does not fit one host would need
sharded DCP files instead (not built). docs/distributed.md has the measurements.
"""
import torch
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor

from nanoalign.model import GPT, Block

FORWARD_METHODS = ("values", "token_values")  # the root's methods called outside forward (PPO's rollout values)


def shard(module, param_dtype=None):
    """fully_shard `module` in place: each Block, each GPT, then the root (module docstring). param_dtype=torch.bfloat16
    gathers parameters in bf16 and reduces gradients in fp32. Returns the module."""
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    for block in [m for m in module.modules() if isinstance(m, Block)]:
        fully_shard(block, mp_policy=mp)
    for gpt in [m for m in module.modules() if isinstance(m, GPT)]:
        if gpt is not module:
            fully_shard(gpt, mp_policy=mp, reshard_after_forward=False)  # the head is read after forward
    fully_shard(module, mp_policy=mp, reshard_after_forward=False)
    for name in FORWARD_METHODS:  # gather the root's parameters around them as around forward
        if callable(getattr(module, name, None)):
            register_fsdp_forward_method(module, name)
    # FSDP2 takes as its root the first unit to run forward; PPO's rollout runs the policy (a child unit) before the
    # root ever runs, so the root is initialised now, as FSDP would at the root's first forward (a private call)
    module._get_fsdp_state()._lazy_init()
    return module


def is_sharded(module):
    return isinstance(module, FSDPModule)


def full_tensor(value):
    """A DTensor (a clipped gradient norm) as the plain tensor every rank agrees on; anything else unchanged."""
    return value.full_tensor() if isinstance(value, DTensor) else value


def full_state(module, optimizer):
    """(model state dict, optimizer state dict) of the sharded `module`, gathered on rank 0's CPU ({} elsewhere):
    the model's keys as module.state_dict() names them, the optimizer's as optimizer.state_dict() numbers them."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model = get_model_state_dict(module, options=options)
    named = get_optimizer_state_dict(module, optimizer, options=options)
    if not named:
        return model, {}
    index = {name: i for i, name in enumerate(n for group in named["param_groups"] for n in group["params"])}
    groups = [{**group, "params": [index[n] for n in group["params"]]} for group in named["param_groups"]]
    return model, {"state": {index[n]: s for n, s in named["state"].items()}, "param_groups": groups}


def load_optimizer_state(module, optimizer, state):
    """Resume: the full optimizer state of ckpt.pt (torch.optim's numbering) into the sharded `optimizer`; each rank
    keeps its shards. The numbering is the order of the optimizer's parameters, named through `module`."""
    names = {id(p): name for name, p in module.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    named = {"state": {order[i]: s for i, s in state["state"].items()},
             "param_groups": [{**group, "params": [order[i] for i in group["params"]]}
                              for group in state["param_groups"]]}
    set_optimizer_state_dict(module, optimizer, named, options=StateDictOptions(full_state_dict=True))
