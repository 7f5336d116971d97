"""RLOO: REINFORCE with a leave-one-out baseline (Kool et al. 2019, "Buy 4 REINFORCE samples, get a baseline for
free!"; Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from Human
Feedback in LLMs", arXiv:2402.14740, Sec. 3, the RLOO estimator).

For each prompt x, k responses y_1..y_k are sampled from the current policy. Each gets the SEQUENCE-level reward

    R_i = r(x, y_i) - beta * sum_t kl_t,     kl_t = log pi(y_it) - log pi_ref(y_it)     (the k1 estimate of the KL)

and the leave-one-out advantage A_i = R_i - 1/(k-1) sum_{j != i} R_j (rl_math.rloo_advantages). The whole response
is one action (no per-token credit assignment, no value network). The gradient estimate of the paper is

    g = 1/k sum_i A_i grad log pi(y_i | x),           log pi(y_i | x) = sum_t log pi(y_it | x, y_i<t)

Loss: TRL's RLOOTrainer form, a PPO-clipped SEQUENCE-level ratio (rloo_loss below),
    L = mean_i max(-A_i rho_i, -A_i clip(rho_i, 1 - eps, 1 + eps)),   rho_i = pi(y_i | x) / pi_old(y_i | x).
With epochs=1 (the default, fully on-policy) rho_i = 1 at the only step, the clip never binds and grad L = -g:
exactly the paper's REINFORCE estimator. epochs > 1 reuses a rollout and the clip keeps those steps near pi_old.

This implementation differs from the paper in:
  - the clipped ratio above (TRL's; the paper has none) -- identical gradient when epochs=1;
  - the KL term's log-probs are of the sampling distribution at `temperature` (TRL does the same), and the
    estimator is selectable (kl_estimator k1 | k2 | k3; the paper's is k1, the log-ratio);
  - rewards are not whitened or normalised (TRL's normalize_advantage is off by default too).
KL knob: kl_coef (beta). Default reward on the toy world: the gold reward (reward_model="gold").
"""
from dataclasses import dataclass
from typing import Annotated, Literal

import torch

from nanoalign.algos.online import OnlineAlgorithm, OnlineConfig, sequence_logps
from nanoalign.algos.rl_math import kl_penalty
from nanoalign.config import NON_NEGATIVE, POSITIVE, Range


def rloo_advantages(rewards, k):
    """REINFORCE leave-one-out advantages (Kool et al. 2019; Ahmadian et al. 2024, the RLOO estimator):

        A_i = r_i - 1/(k-1) sum_{j != i} r_j   =   k/(k-1) (r_i - mean_j r_j)

    rewards: (B*k,) sequence-level rewards, the k samples of one prompt CONSECUTIVE -> (B*k,).
    The baseline excludes r_i, so it is independent of sample i and the gradient estimate unbiased.
    """
    if k < 2:
        raise ValueError("RLOO needs k >= 2 samples per prompt")
    grouped = rewards.view(-1, k)                                     # (B, k)
    baseline = (grouped.sum(dim=1, keepdim=True) - grouped) / (k - 1)  # mean of the other k-1  (B, k)
    return (grouped - baseline).view(-1)


def rloo_loss(logps, old_logps, advantages, clip=0.2):
    """TRL's RLOO policy loss on sequence log-probs: mean_i max(-A_i rho_i, -A_i clip(rho_i)), rho_i = exp(logps_i -
    old_logps_i). logps (B,) with gradient, old_logps (B,), advantages (B,) -> (loss, clipfrac detached)."""
    ratio = torch.exp(logps - old_logps)                              # rho_i  (B,)
    unclipped = -advantages * ratio                                   # -A_i rho_i
    clipped = -advantages * ratio.clamp(1.0 - clip, 1.0 + clip)       # -A_i clip(rho_i)
    loss = torch.maximum(unclipped, clipped).mean()                   # -min(rho A, clip(rho) A), mean over sequences
    clipfrac = (clipped > unclipped).float().mean().detach()
    return loss, clipfrac


def kl_penalised_rewards(scores, logprobs, ref_logprobs, mask, kl_coef, kind="k1"):
    """R_i = score_i - beta * sum_t kl_t: scores (N,), per-token log-probs and mask (N, R) -> (R (N,), kl (N,))."""
    kl = (kl_penalty(logprobs, ref_logprobs, kind) * mask).sum(1)     # sum_t kl_t per sequence  (N,)
    return scores - kl_coef * kl, kl


@dataclass
class RLOOConfig(OnlineConfig):
    samples_per_prompt: Annotated[int, Range(2)] = 4  # k (TRL: rloo_k); the paper uses k = 2 and 4
    kl_coef: Annotated[float, NON_NEGATIVE] = 0.05  # beta of the KL penalty in the reward (TRL's default 0.05)
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"  # per-token KL estimate summed into the reward
    cliprange: Annotated[float, POSITIVE] = 0.2  # sequence-ratio clip range eps (binds only when epochs > 1)


class RLOO(OnlineAlgorithm):
    name = "rloo"
    Config = RLOOConfig
    key_metrics = ("objective/scores", "objective/kl")

    def __init__(self, cfg, policy, tokenizer, ctx):
        self.rows_per_prompt = cfg.samples_per_prompt  # every sample is a training row
        super().__init__(cfg, policy, tokenizer, ctx)

    def make_rows(self, rollout):
        cfg = self.cfg
        rewards, _ = kl_penalised_rewards(rollout.scores, rollout.logprobs, rollout.ref_logprobs,
                                          rollout.response_mask, cfg.kl_coef, cfg.kl_estimator)  # (N,)
        self.rollout_metrics["objective/rlhf_reward"] = rewards.mean()
        advantages = rloo_advantages(rewards, cfg.samples_per_prompt)  # R_i - mean of the other k-1  (N,)
        return rollout.batch(advantages=advantages, old_logps=rollout.logprobs.sum(1))

    def loss(self, model, batch):
        _, logps, _ = sequence_logps(model, batch, self.cfg.temperature, self.cfg.fused_logps)  # log pi(y_i | x)  (B,)
        old_logps = batch["old_logps"] if self.cfg.epochs > 1 else logps.detach()  # on-policy: rho = 1 exactly
        loss, clipfrac = rloo_loss(logps, old_logps, batch["advantages"], self.cfg.cliprange)
        return loss, {"policy/clipfrac_avg": clipfrac, "loss/policy_avg": loss.detach(), **self.rollout_metrics}
