"""What RLOO, GRPO, online DPO and RAFT share: a stream of prompts, a frozen reference, a scorer, and a rollout
(nanoalign/rollout.py) at the start of every `epochs` optimizer steps, cut into the trainer's micro-batches.

Batch sizes. `batch_size` (the trainer's, global) counts TRAINING ROWS per optimizer step: sequences for RLOO and
GRPO, pairs for online DPO, kept best samples for RAFT. One rollout makes exactly one global batch of rows:
each rank generates its micro_batch_size * grad_accum rows' worth of samples (`rows_per_prompt` rows per prompt),
then yields them as grad_accum micro-batches per step for `epochs` steps, reshuffled each step (epochs > 1 reuses
the samples, with ratio clipping, as PPO does; TRL's num_ppo_epochs / num_iterations).

Reproducibility: the prompts of rollout r are the r-th slice of a seeded permutation (nanoalign.data.micro_batches)
and its sampling generator is seeded by (seed, r, rank). A run resumed in the middle of a rollout's epochs
regenerates that rollout with the resumed weights, then skips the steps already done.
"""
import itertools
from dataclasses import dataclass

import torch

from nanoalign.data import collate, load_examples, micro_batches
from nanoalign.reference import Reference
from nanoalign.rollout import generate_rollout, minibatches, response_logps
from nanoalign.scorers import get_scorer
from nanoalign.trainer import Algorithm


@dataclass
class OnlineConfig:
    reward_model: str = "gold"  # scorer: "gold" (the toy world's gold reward) or "ckpt:<dir>" of --algo=rm
    max_new_tokens: int = 40  # response budget (cut further to fit the model's block_size)
    temperature: float = 1.0  # sampling temperature of the rollout (log-probs are of this distribution)
    missing_eos_penalty: float = 0.0  # subtracted from the score of a response cut before its EOS; 0 -> off
    epochs: int = 1  # optimizer steps on each rollout (TRL: num_ppo_epochs / num_iterations); 1 = on-policy
    generation_batch_size: int = 256  # sequences per generate / reference forward call


def no_scores(prompts, responses):
    """The scorer of reward_model="": no reward signal to monitor (e.g. online DPO with an LLM judge)."""
    return torch.zeros(len(prompts))


def sequence_logps(model, batch, temperature, fused=True):
    """(per-token log-probs (B, R), their sum over each response (B,), response lengths (B,))."""
    per_token = response_logps(model, batch, temperature, fused)  # (B, R), 0 on padding
    return per_token, per_token.sum(1), batch["response_mask"].sum(1)


class OnlineAlgorithm(Algorithm):
    """Subclasses set `samples_per_prompt`, `rows_per_prompt` and `uses_reference` (before this __init__), and
    implement make_rows(rollout) -> dict of (rows, ...) tensors, and loss(). The metrics of the current rollout
    (self.rollout_metrics) join each micro-batch's metrics."""
    data_format = "prompt"
    samples_per_prompt = 2  # responses sampled per prompt
    rows_per_prompt = 1  # training rows one prompt yields (k sequences for RLOO/GRPO, 1 pair, 1 best sample)
    uses_reference = True

    def __init__(self, cfg, policy, tokenizer, ctx):
        super().__init__(cfg, policy, tokenizer, ctx)
        max_prompt_len = max(1, self.max_len - cfg.max_new_tokens)
        self.prompts = load_examples(cfg.data, "prompt", tokenizer, cfg.max_len, max_prompt_len, log=self.log)
        self.scorer = get_scorer(cfg.reward_model, ctx.device) if cfg.reward_model else no_scores
        self.reference = Reference(policy, fused=cfg.fused_logps) if self.uses_reference else None
        rows = ctx.micro_batch_size * ctx.grad_accum  # this rank's rows per optimizer step
        if rows % self.rows_per_prompt:
            raise ValueError(f"{self.name}: micro_batch_size * grad_accum = {rows} rows per rank per step must be a "
                             f"multiple of {self.rows_per_prompt} (samples of one prompt stay in one rollout)")
        self.prompts_per_rollout = rows // self.rows_per_prompt
        self.rollout_metrics = {}

    def make_rows(self, rollout):
        raise NotImplementedError

    def batches(self, start_step):
        c, cfg = self.ctx, self.cfg
        first, steps_done = divmod(start_step, cfg.epochs)  # rollout in progress, steps of it already taken
        prompt_stream = micro_batches(self.prompts, self.prompts_per_rollout, 1, c.rank, c.world_size, cfg.seed,
                                      first, lambda e: collate(e, self.tokenizer.pad_id), cfg.bucket_by_length)
        for r in itertools.count(first):
            seed = cfg.seed + 1_000_003 * (r * c.world_size + c.rank + 1)  # a distinct stream per rollout and rank
            rollout = generate_rollout(
                self.policy, self.tokenizer, next(prompt_stream)["prompt_ids"], self.samples_per_prompt,
                cfg.max_new_tokens, self.scorer, temperature=cfg.temperature, reference=self.reference,
                batch_size=cfg.generation_batch_size, generator=torch.Generator(c.device).manual_seed(seed),
                autocast=c.autocast, recompute_logprobs=self.uses_reference,  # full forwards: KL = 0 at pi_ref
                fused=cfg.fused_logps)
            rollout.scores -= cfg.missing_eos_penalty * (~rollout.eos).float()  # TRL's missing_eos_penalty
            self.rollout_metrics = {"objective/scores": rollout.scores.mean(),
                                    "val/num_eos_tokens": rollout.eos.float().sum(),
                                    "val/response_length": rollout.response_mask.sum(1).mean()}
            if rollout.ref_logprobs is not None:  # sum_t log pi_old(y_t) - log pi_ref(y_t), per sequence (k1)
                kl = ((rollout.logprobs - rollout.ref_logprobs) * rollout.response_mask).sum(1)  # (N,)
                self.rollout_metrics["objective/kl"] = kl.mean()
            rows = self.make_rows(rollout)
            shuffle = torch.Generator().manual_seed(seed)
            skip = c.grad_accum * steps_done if r == first else 0
            yield from itertools.islice(minibatches(rows, c.micro_batch_size, cfg.epochs, shuffle), skip, None)
