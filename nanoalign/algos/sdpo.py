"""sDPO: stepwise DPO (Kim et al. 2024, "sDPO: Don't Use Your Data All at Once", arXiv:2403.19270).

DPO (algos/dpo.py: Rafailov et al. 2023, Eq. 7) with the preference data cut into T chunks D_1..D_T that are used
one after another. Step t trains on D_t alone, and its reference model is the model aligned by step t-1:

    L_t = -E_{(x, y_w, y_l) ~ D_t} log sigmoid(beta [log pi(y_w|x)/M_{t-1}(y_w|x) - log pi(y_l|x)/M_{t-1}(y_l|x)])

with M_0 the SFT model (plain DPO's pi_ref); the target model of step t starts from M_{t-1} too (here: it simply
continues training). The paper's argument: a reference that is already more aligned raises the lower bound the
policy's log-ratio margin must clear, so later steps learn against a stricter reference. T = 1 is DPO exactly
(tests/test_iterative.py checks the losses are identical). The loss is dpo.preference_loss with DPO's keys, so any
reference-based --loss_type (ipo, robust, ...) goes stepwise too; the reference-free simpo/cpo have nothing to
replace and are refused.

Schedule. One run of max_steps optimizer steps is cut into sdpo_chunks spans of max_steps / T steps; span t draws its
batches only from chunk t (reshuffled passes over the chunk, data.micro_batches, seeded by seed + t). At the first
step of span t >= 1 the reference becomes the current policy, M_{t-1}:
  ref_logps="precompute" (DPO's default): the reference log-probs of chunk t, and of the eval data, are computed
      again with the then-current policy, once, as DPO precomputes them before its first step (no model is kept).
      Under LoRA this works too: the current policy is the base WITH its adapters;
  ref_logps="live": the reference becomes a fresh frozen deep copy of the current policy (nanoalign.reference
      .Reference). Under LoRA that is refused: Reference is then the adapters-off base, which cannot be replaced
      without merging the adapters into it (a LoRA run would have to train fresh adapters per step); use
      ref_logps=precompute, which gives the same log-probs.
Resume is exact at any step: the checkpoint holds the reference of the current span (its chunk's log-probs, or the
live copy's weights), and a run resumed exactly at a boundary takes the reference from the weights it resumed.

Chunk order. sdpo_order="data" (default) cuts the file in its own order. "easy_to_hard" first sorts the pairs by the
SFT model's log-prob margin log M_0(y_w|x) - log M_0(y_l|x), largest first: pairs the reference already ranks right
(easy) go to the first chunk, those it ranks most wrongly (hard) to the last -- the paper's easy-to-hard curriculum,
with "easy" measured by the reference model's own margin (the paper judges difficulty with a model's reward
accuracy on each dataset and orders whole datasets, OpenOrca before UltraFeedback).

This implementation differs from the paper in:
  - the paper runs each step as its own DPO training (own learning-rate schedule, fresh optimizer); here the steps
    share one run: one warmup + cosine schedule over all max_steps, and AdamW's moments carry over the boundaries;
  - the paper's chunks are whole datasets of different sizes (and in its ablation equal slices of one dataset);
    here they are equal slices of one file, each given max_steps / T steps whatever its size (a span longer than a
    pass over its chunk reshuffles it and passes again, a shorter one leaves part of it unused);
  - "easy" is the reference model's margin (above), not a reward accuracy.
KL knob: beta. Metrics: DPO's (rewards/* are measured against the current step's reference), plus sdpo/chunk.
"""
import itertools
from dataclasses import dataclass
from typing import Annotated, Literal

import torch

from nanoalign.algos.dpo import DPO, REFERENCE_FREE, DPOConfig
from nanoalign.config import AT_LEAST_1
from nanoalign.data import micro_batches
from nanoalign.logps import batch_logps
from nanoalign.lora import lora_layers
from nanoalign.reference import Reference, precompute

REF_KEYS = ("ref_chosen_logps", "ref_rejected_logps")


@dataclass
class SDPOConfig(DPOConfig):
    sdpo_chunks: Annotated[int, AT_LEAST_1] = 2  # T: chunks of the data, used one after another (1 -> DPO)
    sdpo_order: Literal["data", "easy_to_hard"] = "data"  # file order, or by the SFT model's margin (easy first)


def chunk_bounds(n, chunks):
    """[start, end) of `chunks` consecutive near-equal slices of range(n): n=10, chunks=3 -> (0,3), (3,6), (6,10)."""
    return [(c * n // chunks, (c + 1) * n // chunks) for c in range(chunks)]


def easy_to_hard(examples):
    """The examples sorted by their reference margin ref_chosen_logps - ref_rejected_logps, largest (easiest) first;
    ties keep their order (a stable sort)."""
    return sorted(examples, key=lambda e: -(e["ref_chosen_logps"] - e["ref_rejected_logps"]))


class SDPO(DPO):
    name = "sdpo"
    Config = SDPOConfig

    def __init__(self, cfg, policy, tokenizer, ctx):
        if cfg.loss_type in REFERENCE_FREE:
            raise ValueError(f"sdpo replaces the reference model at each step; loss_type={cfg.loss_type!r} has none")
        if cfg.ref_logps == "live" and lora_layers(policy):
            raise ValueError("sdpo with ref_logps=live under LoRA: the reference is the adapters-off base model, which "
                             "cannot become the current policy without merging the adapters; use "
                             "--ref_logps=precompute (the same reference log-probs, computed with the adapters on)")
        if cfg.max_steps < cfg.sdpo_chunks:
            raise ValueError(f"sdpo: max_steps={cfg.max_steps} is fewer than sdpo_chunks={cfg.sdpo_chunks} (a step "
                             "per chunk at least)")
        super().__init__(cfg, policy, tokenizer, ctx)
        if cfg.sdpo_order == "easy_to_hard":
            if cfg.ref_logps == "live":  # the margins of M_0, once (all ranks get the same values: precompute gathers)
                precompute(self.examples, REF_KEYS, self.reference_logps, self.collate, ctx)
            self.examples = easy_to_hard(self.examples)
            if cfg.ref_logps == "live":
                for e in self.examples:  # a live run must not read them as its reference
                    del e["ref_chosen_logps"], e["ref_rejected_logps"]
        self.chunks = [self.examples[a:b] for a, b in chunk_bounds(len(self.examples), cfg.sdpo_chunks)]
        self.step_bounds = [c * cfg.max_steps // cfg.sdpo_chunks for c in range(cfg.sdpo_chunks + 1)]
        per_step = cfg.batch_size  # examples per optimizer step over all ranks
        if len(self.chunks[0]) < per_step:
            raise ValueError(f"sdpo: {len(self.examples)} pairs in {cfg.sdpo_chunks} chunks give {len(self.chunks[0])} "
                             f"per chunk, fewer than one batch of {per_step}: use fewer chunks")
        self.ref_chunk = 0  # the chunk whose step's reference is in use: 0 = the initial weights M_0

    def chunk_at(self, step):
        """The chunk that optimizer step `step` (0-based) trains on."""
        return max(c for c in range(self.cfg.sdpo_chunks) if self.step_bounds[c] <= step)

    @torch.no_grad()
    def current_policy_logps(self, batch):
        """DPO.reference_logps' fields under the CURRENT policy (eval mode; under LoRA with its adapters on)."""
        was_training = self.policy.training
        self.policy.eval()
        try:
            logps = batch_logps(self.policy, batch["input_ids"], batch["loss_mask"], fused=self.cfg.fused_logps)[0]
        finally:
            self.policy.train(was_training)
        B = logps.shape[0] // 2  # (2B,): chosen rows, then rejected
        return {"ref_chosen_logps": logps[:B], "ref_rejected_logps": logps[B:]}

    def replace_reference(self, chunk):
        """The reference of step `chunk` is the current policy M_{chunk-1}."""
        if self.cfg.ref_logps == "precompute":
            for examples in (self.chunks[chunk], self.eval_examples):
                precompute(examples, REF_KEYS, self.current_policy_logps, self.collate, self.ctx)
        else:
            self.reference = Reference(self.policy, fused=self.cfg.fused_logps, dtype=self.ctx.inference_dtype)
        self.ref_chunk = chunk
        self.log(f"sdpo: step {chunk + 1}/{self.cfg.sdpo_chunks} from optimizer step {self.step_bounds[chunk]}: "
                 f"{len(self.chunks[chunk])} pairs, the reference is now the policy of that step")

    def batches(self, start_step):
        c, cfg = self.ctx, self.cfg
        first = self.chunk_at(start_step)
        for chunk in range(first, cfg.sdpo_chunks):
            begin, end = self.step_bounds[chunk], self.step_bounds[chunk + 1]
            if chunk > 0 and (chunk > first or start_step == begin):  # entering the chunk (not resuming inside it)
                self.replace_reference(chunk)
            elif self.ref_chunk != chunk:  # resumed inside the chunk: load_state_dict must have restored its reference
                raise RuntimeError(f"sdpo: resumed at step {start_step} inside chunk {chunk}, but the checkpoint holds "
                                   f"the reference of chunk {self.ref_chunk}")
            skip = max(start_step, begin) - begin  # steps of this chunk already done
            stream = micro_batches(self.chunks[chunk], c.micro_batch_size, c.grad_accum, c.rank, c.world_size,
                                   cfg.seed + chunk, skip, self.collate, bucket=cfg.bucket_by_length)
            last = chunk == cfg.sdpo_chunks - 1  # the last chunk goes on as long as the trainer asks
            yield from stream if last else itertools.islice(stream, (end - begin - skip) * c.grad_accum)

    def loss(self, model, batch):
        loss, metrics = super().loss(model, batch)
        return loss, {**metrics, "sdpo/chunk": float(self.ref_chunk)}

    def state_dict(self):
        """The reference of the current step: {"sdpo_chunk": t} and, for t >= 1, the chunk's and the eval data's
        reference log-probs (precompute) or the live copy's weights."""
        state = {"sdpo_chunk": self.ref_chunk}
        if self.ref_chunk == 0:  # M_0: rebuilt from init_from on resume, as DPO does
            return state
        if self.cfg.ref_logps == "live":
            return {**state, "sdpo_reference": self.reference.frozen.state_dict()}
        stack = lambda examples: torch.tensor([[e[k] for k in REF_KEYS] for e in examples], dtype=torch.float32)
        return {**state, "sdpo_ref_logps": stack(self.chunks[self.ref_chunk]),
                "sdpo_eval_ref_logps": stack(self.eval_examples).view(-1, 2)}

    def load_state_dict(self, ckpt):
        chunk = ckpt.get("sdpo_chunk", 0)
        if chunk == 0:
            return
        if self.cfg.ref_logps == "live":
            self.reference = Reference(self.policy, fused=self.cfg.fused_logps, dtype=self.ctx.inference_dtype)
            self.reference.frozen.load_state_dict(ckpt["sdpo_reference"])
        else:
            for examples, saved in ((self.chunks[chunk], ckpt["sdpo_ref_logps"]),
                                    (self.eval_examples, ckpt["sdpo_eval_ref_logps"])):
                for e, row in zip(examples, saved.tolist()):  # float32 values, as precompute stores them
                    e.update(zip(REF_KEYS, row))
        self.ref_chunk = chunk
