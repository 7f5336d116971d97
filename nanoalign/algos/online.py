"""What every online algorithm shares (PPO, RLOO, GRPO, online DPO, RAFT): a stream of prompts, the reference, a
scorer, and a rollout (nanoalign/rollout.py) cut into the trainer's micro-batches for `epochs` passes.

Batch sizes. `batch_size` (the trainer's, global) counts TRAINING ROWS per optimizer step: sequences for PPO, RLOO
and GRPO, pairs for online DPO, kept best samples for RAFT. One rollout makes `rollout_batch_size` rows over all
ranks (0: one global batch, TRL's RLOO/GRPO layout; PPO's default 64: several minibatches, as lm-human-preferences),
`rows_per_prompt` rows per prompt; they are yielded as micro-batches for `epochs` passes, reshuffled every pass
(epochs > 1 reuses the samples, with ratio clipping; TRL's num_ppo_epochs / num_iterations). So each rollout lasts
steps_per_rollout = rollout_batch_size / batch_size * epochs optimizer steps.

Reproducibility: the prompts of rollout r are the r-th slice of a seeded permutation (nanoalign.data.micro_batches)
and its sampling generator is seeded by (seed, r, rank). Resume is exact at rollout boundaries, which is where the
trainer writes checkpoints of an online run (it refuses a checkpoint from inside a rollout: the rest of that rollout
cannot be replayed, since its samples came from weights that no longer exist).
"""
import itertools
from dataclasses import dataclass
from typing import Annotated

import torch

from nanoalign.config import AT_LEAST_1, NON_NEGATIVE, POSITIVE, Range
from nanoalign.data import collate, load_examples, micro_batches
from nanoalign.reference import Reference
from nanoalign.rollout import generate_rollout, minibatches, response_logps
from nanoalign.scorers import get_scorer
from nanoalign.trainer import Algorithm


@dataclass
class OnlineConfig:
    reward_model: str = ""  # scorer: "ckpt:<dir>" of --algo=rm, or a registered one ("gold" on the toy world, which
    #                         train.py fills in when no --data is given; PPO gets the toy world's proxy RM)
    monitor_reward: str = ""  # a second reward logged as objective/monitor_scores, not optimised
    samples_per_prompt: Annotated[int, AT_LEAST_1] = 2  # responses sampled per prompt
    rollout_batch_size: Annotated[int, NON_NEGATIVE] = 0  # training rows per rollout over all ranks; 0 -> batch_size
    epochs: Annotated[int, AT_LEAST_1] = 1  # passes over each rollout (TRL: num_ppo_epochs / num_iterations); 1 = on-policy
    max_new_tokens: Annotated[int, AT_LEAST_1] = 40  # response budget (cut further to fit the model's block_size)
    temperature: Annotated[float, POSITIVE] = 1.0  # sampling temperature of the rollout (log-probs are of this distribution)
    top_k: Annotated[int, NON_NEGATIVE] = 0  # 0 -> off; top-k / top-p make the sampled KL estimate biased
    top_p: Annotated[float, Range(0, 1, low_open=True)] = 1.0  # 1 -> off
    missing_eos_penalty: float = 0.0  # subtracted from the score of a response cut before its EOS; 0 -> off
    generation_batch_size: Annotated[int, AT_LEAST_1] = 256  # sequences per generate / reference forward call


def no_scores(prompts, responses):
    """The scorer of reward_model="" where an algorithm needs none (online DPO with an LLM judge)."""
    return torch.zeros(len(prompts))


def sequence_logps(model, batch, temperature, fused=True):
    """(per-token log-probs (B, R), their sum over each response (B,), response lengths (B,))."""
    per_token = response_logps(model, batch, temperature, fused)  # (B, R), 0 on padding
    return per_token, per_token.sum(1), batch["response_mask"].sum(1)


class OnlineAlgorithm(Algorithm):
    """Subclasses set `rows_per_prompt` and `uses_reference` (before this __init__), and implement
    make_rows(rollout) -> dict of (rows, ...) tensors, and loss(). The metrics of the current rollout
    (self.rollout_metrics) join each micro-batch's metrics."""
    data_format = "prompt"
    rows_per_prompt = 1  # training rows one prompt yields (k sequences for RLOO/GRPO, 1 pair, 1 best sample)
    uses_reference = True
    needs_reward = True  # False: reward_model may be "" (an LLM judge decides instead)

    def __init__(self, cfg, policy, tokenizer, ctx):
        super().__init__(cfg, policy, tokenizer, ctx)
        if self.needs_reward and not cfg.reward_model:
            raise ValueError(f'{self.name}: reward_model is empty: give "ckpt:<reward model dir>" (or "gold" on the '
                             "toy world, which train.py fills in when no --data is given)")
        max_prompt_len = max(1, self.max_len - cfg.max_new_tokens)
        self.prompts = load_examples(cfg.data, "prompt", tokenizer, cfg.max_len, max_prompt_len, log=self.log)
        dtype = ctx.inference_dtype  # no-grad models in bf16 in a bf16 run (nanoalign/precision.py)
        self.scorer = get_scorer(cfg.reward_model, ctx.device, dtype=dtype) if cfg.reward_model else no_scores
        self.monitor = get_scorer(cfg.monitor_reward, ctx.device, dtype=dtype) if cfg.monitor_reward else None
        self.reference = Reference(policy, fused=cfg.fused_logps, dtype=dtype) if self.uses_reference else None
        rollout_rows = cfg.rollout_batch_size or cfg.batch_size  # over all ranks
        if rollout_rows % cfg.batch_size or rollout_rows % (ctx.world_size * self.rows_per_prompt):
            raise ValueError(f"{self.name}: rollout_batch_size={rollout_rows} must be a multiple of batch_size="
                             f"{cfg.batch_size} and of world_size * rows per prompt = "
                             f"{ctx.world_size * self.rows_per_prompt} (the samples of a prompt stay in one rollout)")
        self.prompts_per_rollout = rollout_rows // ctx.world_size // self.rows_per_prompt  # this rank's
        self.steps_per_rollout = rollout_rows // cfg.batch_size * cfg.epochs
        self.rollout_metrics = {}

    def make_rows(self, rollout):
        raise NotImplementedError

    def batches(self, start_step):
        c, cfg = self.ctx, self.cfg
        first = start_step // self.steps_per_rollout  # the trainer resumes at rollout boundaries only
        prompt_stream = micro_batches(self.prompts, self.prompts_per_rollout, 1, c.rank, c.world_size, cfg.seed,
                                      first, lambda e: collate(e, self.tokenizer.pad_id), cfg.bucket_by_length)
        for r in itertools.count(first):
            seed = cfg.seed + 1_000_003 * (r * c.world_size + c.rank + 1)  # a distinct stream per rollout and rank
            rollout = generate_rollout(
                self.policy, self.tokenizer, next(prompt_stream)["prompt_ids"], cfg.samples_per_prompt,
                cfg.max_new_tokens, self.scorer, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                reference=self.reference, batch_size=cfg.generation_batch_size,
                generator=torch.Generator(c.device).manual_seed(seed), autocast=c.autocast,
                recompute_logprobs=self.recompute_logprobs, fused=cfg.fused_logps)
            rollout.scores -= cfg.missing_eos_penalty * (~rollout.eos).float()  # TRL's missing_eos_penalty
            self.rollout_metrics = {"objective/scores": rollout.scores.mean(),
                                    "val/num_eos_tokens": rollout.eos.float().sum(),
                                    "val/response_length": rollout.response_mask.sum(1).mean()}
            if rollout.ref_logprobs is not None:  # sum_t log pi_old(y_t) - log pi_ref(y_t), per sequence (k1)
                kl = ((rollout.logprobs - rollout.ref_logprobs) * rollout.response_mask).sum(1)  # (N,)
                self.rollout_metrics["objective/kl"] = kl.mean()
            if self.monitor is not None:
                self.rollout_metrics["objective/monitor_scores"] = self.monitor(rollout.prompts, rollout.responses).mean()
            rows = self.make_rows(rollout)
            yield from minibatches(rows, c.micro_batch_size, cfg.epochs, torch.Generator().manual_seed(seed))

    @property
    def recompute_logprobs(self):
        """Old log-probs from one full forward instead of generate()'s incremental ones: on whenever there is a
        reference, so that the KL of the policy to itself is exactly 0 before the first update."""
        return self.uses_reference
