"""The one reference model pi_ref, used by every algorithm that has one (DPO family, KTO, PPO, RLOO, GRPO, online DPO).

pi_ref is the policy's initial weights. `Reference(policy, copy=True)` keeps a frozen deep copy for the whole run
(with `dtype`=bf16 in a bf16 run, its linear weights stored in bf16 once: precision.cast_for_inference_);
`copy=False` answers with `policy` itself, which is right only before the first optimizer step (the precompute
pass of the offline algorithms) or when `policy` is already a separate frozen model. Under LoRA there is never a
copy: pi_ref is the policy with its adapters disabled, exactly the base weights. Every query runs in eval mode (no
dropout) under no_grad and puts the model's train/eval mode back afterwards; `fused` is batch_logps' (the run's
fused_logps).

`precompute` stores reference log-probs on a dataset's examples once, before training, so the offline algorithms
keep no second model (DPO's default ref_logps="precompute"; TRL's precompute_ref_log_probs).
"""
import contextlib
import copy as copy_module

import torch
import torch.distributed as dist

from nanoalign.data import to_device
from nanoalign.logps import batch_logps
from nanoalign.lora import disable_lora, lora_layers
from nanoalign.precision import cast_for_inference_, inference_autocast
from nanoalign.rollout import response_logps


class Reference:
    def __init__(self, policy, copy=True, fused=True, dtype=None):
        self.policy, self.fused, self.dtype = policy, fused, dtype
        keep_copy = copy and not lora_layers(policy)  # LoRA: the adapters off are pi_ref, no copy
        self.frozen = cast_for_inference_(copy_module.deepcopy(policy), dtype) if keep_copy else None

    @contextlib.contextmanager
    def model(self):
        """pi_ref as a module: eval mode, adapters off under LoRA; the previous mode is restored on exit."""
        model = self.frozen if self.frozen is not None else self.policy
        was_training = model.training
        model.eval()
        precision = inference_autocast(model, self.dtype) if model is self.frozen else contextlib.nullcontext()
        try:
            with disable_lora(model), precision:  # a no-op without adapters / outside a bf16 run
                yield model
        finally:
            model.train(was_training)

    @torch.no_grad()
    def logps(self, input_ids, loss_mask):
        """Summed completion log-probs (B,) under pi_ref (batch_logps)."""
        with self.model() as model:
            return batch_logps(model, input_ids, loss_mask, fused=self.fused)[0]

    @torch.no_grad()
    def response_logps(self, batch, temperature=1.0):
        """Per-token log-probs (B, R) of a rollout's responses under pi_ref at the sampling temperature."""
        with self.model() as model:
            return response_logps(model, batch, temperature, self.fused)


@torch.no_grad()
def precompute(examples, names, compute, collate_fn, ctx):
    """Store e[name] = float for every example, from compute(batch) -> {name: (b,) tensor}, run once.
    Under DDP rank r computes examples r, r + W, r + 2W, ... and all_gather shares the shards (cost / W)."""
    mine = list(range(ctx.rank, len(examples), ctx.world_size))
    per_rank = -(-len(examples) // ctx.world_size)  # ceil(N / W): shards padded to one shape for all_gather
    values = torch.zeros(per_rank, len(names), device=ctx.device)  # (per_rank, K)
    for i in range(0, len(mine), ctx.micro_batch_size):
        batch = to_device(collate_fn([examples[j] for j in mine[i:i + ctx.micro_batch_size]]), ctx.device)
        with ctx.autocast():
            out = compute(batch)
        values[i:i + len(out[names[0]])] = torch.stack([out[n].float() for n in names], 1)
    shards = [values]
    if ctx.world_size > 1:
        shards = [torch.empty_like(values) for _ in range(ctx.world_size)]
        dist.all_gather(shards, values)
    for rank, shard in enumerate(shards):
        for k, row in enumerate(shard.tolist()):
            if rank + k * ctx.world_size < len(examples):  # skip the padding rows
                examples[rank + k * ctx.world_size].update(zip(names, row))
