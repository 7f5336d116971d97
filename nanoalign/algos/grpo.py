"""GRPO: Group Relative Policy Optimization (Shao et al. 2024, "DeepSeekMath", arXiv:2402.03300, Sec. 4.1).

For each prompt q, a group of G responses o_1..o_G is sampled from pi_old (the policy at the rollout). With outcome
supervision (Sec. 4.1.2) every token of o_i gets the group-normalised advantage

    A_i = (r_i - mean(r)) / std(r)                       (rl_math.grpo_advantages; 0 for a group of equal rewards)

and the policy maximises Eq. 3 (rl_math.grpo_loss, negated):

    1/G sum_i 1/|o_i| sum_t [ min(rho_it A_i, clip(rho_it, 1-eps, 1+eps) A_i) - beta D_it ],
    rho_it = pi(o_it) / pi_old(o_it),    D_it = pi_ref/pi - log(pi_ref/pi) - 1   (the k3 estimator, Eq. 4).

Unlike PPO and RLOO the KL to the reference is a loss term, not part of the reward, and there is no value network:
the group mean is the baseline.

Aggregation: the default is the paper's per-sequence mean (1/|o_i| inside, then the mean over sequences:
aggregation="seq_mean"), so a reader of Eq. 3 finds it here. Its known cost is a length bias: each token of a long
response weighs less, so long wrong answers are penalised less per token (Dr. GRPO, Liu et al. 2025; DAPO, Yu et al.
2025). aggregation="token_mean" weighs every token of the micro-batch equally (DAPO's token-level loss).

This implementation differs from the paper in:
  - G = samples_per_prompt defaults to 8 (the paper samples 64 per question);
  - std is the unbiased sample std plus eps = 1e-4, as TRL / OpenRLHF / verl (the paper does not say);
    scale_rewards=False drops the division (Dr. GRPO);
  - epochs (the paper's mu) defaults to 1; then pi_old = pi: the ratio is exactly 1 (old log-probs are the
    detached current ones, as in TRL), the clip never binds and the gradient is the plain policy gradient with
    group advantages plus the KL term. epochs > 1 uses the rollout's recomputed log-probs as pi_old;
  - log-probs are of the sampling distribution at `temperature` (D_it too); the means run over each micro-batch
    (with accumulation the trainer averages micro-batch means);
  - the iterative reward-model retraining of Sec. 4.1.3 is not implemented (the reward is fixed).
Where TRL 1.16's GRPOTrainer differs by default: beta = 0 (no KL term); with beta != 0 its k3 term is multiplied by
the importance ratio pi / pi_old (use_bias_correction_kl=True), which is 1 in value on-policy but not in gradient,
so its KL gradient is not Eq. 3's; and its loss is the token mean (loss_type="dapo"). docs/online.md has the details.
KL knob: kl_coef (beta, the paper's 0.04). Default reward on the toy world: the gold reward (reward_model="gold").
"""
from dataclasses import dataclass
from typing import Annotated, Literal

import torch

from nanoalign.algos.online import OnlineAlgorithm, OnlineConfig, sequence_logps
from nanoalign.algos.rl_math import kl_penalty, masked_mean
from nanoalign.config import NON_NEGATIVE, POSITIVE, Range


def grpo_advantages(rewards, k, eps=1e-4, scale=True):
    """GRPO outcome-supervision advantages (Shao et al. 2024, DeepSeekMath Sec. 4.1.2, used in Eq. 3):

        A_i = (r_i - mean(r)) / (std(r) + eps)       over the k samples of the same prompt

    rewards: (B*k,) with the k samples of one prompt consecutive -> (B*k,), the same for every token.
    std is the UNBIASED sample std (N-1): the paper does not say which; this is torch.std's default
    and what TRL, OpenRLHF and verl use, so advantages match theirs (for k=2 the two conventions
    differ by sqrt 2). A group of identical rewards gets exactly 0 (no learning signal), never NaN:
    it is zeroed explicitly because float rounding of the mean leaves r - mean ~ 1e-7 in float32,
    which divided by (std + eps) gives spurious advantages up to ~1e-3 (six rewards of 2.1).
    scale=False drops the std division (Dr. GRPO, Liu et al. 2025, which argues the std
    up-weights prompts that are too easy or too hard).
    """
    if k < 2:
        raise ValueError("GRPO needs k >= 2 samples per prompt")
    grouped = rewards.view(-1, k)                                     # (B, k)
    centered = grouped - grouped.mean(dim=1, keepdim=True)            # r_i - mean(r)
    if scale:
        centered = centered / (grouped.std(dim=1, keepdim=True) + eps)  # / (std(r) + eps), unbiased std
    same = (grouped == grouped[:, :1]).all(dim=1, keepdim=True)       # no signal in this group  (B, 1)
    return torch.where(same, torch.zeros_like(centered), centered).view(-1)


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, clip=0.2, kl_coef=0.0,
              aggregation="seq_mean", clip_high=None):
    """GRPO objective (Shao et al. 2024, DeepSeekMath Eq. 3), negated to a loss:

        L = -1/G sum_i 1/|o_i| sum_t [min(rho_it A_i, clip(rho_it, 1-eps, 1+eps) A_i) - beta D_it]

    with rho_it = pi(o_it) / pi_old(o_it) and D_it the k3 estimate of KL(pi || pi_ref) (Eq. 4).
    logp, old_logp, ref_logp, mask: (B, T); advantages: (B,) one per sequence (outcome supervision).
    Returns loss, clipfrac, kl (the last two detached; kl = token mean of k3, 0 if ref_logp is None).

    aggregation:
      "seq_mean"   (default) the paper's 1/|o_i| mean inside each sequence, then the mean over
                   sequences. Every sequence weighs the same, so a token of a long answer weighs less:
                   a long wrong answer is penalised less per token than a short one, a length bias
                   toward long incorrect outputs (Dr. GRPO, Liu et al. 2025; DAPO Sec. 3.3).
      "token_mean" the mean over all valid tokens of the batch (DAPO's token-level loss), which
                   weighs every token the same; preferable for long reasoning traces.
    The default is the paper's equation, so that a reader of Eq. 3 finds it here; token_mean is one
    flag away. Departures: clip_high (DAPO's "clip-higher", eps_high != eps_low) is an option, off by
    default; the mean runs over the (micro-)batch given, like ppo_policy_loss. Dr. GRPO's
    alternative (divide the token sum by a constant length) is not implemented.
    """
    if aggregation not in ("seq_mean", "token_mean"):
        raise ValueError(f"unknown aggregation {aggregation!r}; choose 'seq_mean' or 'token_mean'")
    mask = mask.to(logp.dtype)
    adv = advantages.unsqueeze(1)                                     # A_i for every token  (B, 1)
    ratio = torch.exp(logp - old_logp)                                # rho_it  (B, T)
    clipped_ratio = ratio.clamp(1.0 - clip, 1.0 + (clip if clip_high is None else clip_high))
    per_token = -torch.minimum(ratio * adv, clipped_ratio * adv)      # -min(rho A, clip(rho) A)  (B, T)
    clipfrac = masked_mean((clipped_ratio * adv < ratio * adv).float(), mask).detach()
    kl = torch.zeros((), device=logp.device)
    if ref_logp is not None:
        kl_tokens = kl_penalty(logp, ref_logp, "k3")                  # D_it, Eq. 4  (B, T)
        per_token = per_token + kl_coef * kl_tokens                   # + beta D_it
        kl = masked_mean(kl_tokens.detach(), mask)
    if aggregation == "seq_mean":
        loss = masked_mean(per_token, mask, dim=1).mean()             # 1/G sum_i 1/|o_i| sum_t
    else:
        loss = masked_mean(per_token, mask)                           # sum_it / sum_i |o_i|
    return loss, clipfrac, kl


@dataclass
class GRPOConfig(OnlineConfig):
    samples_per_prompt: Annotated[int, Range(2)] = 8  # G, the group size (TRL: num_generations)
    kl_coef: Annotated[float, NON_NEGATIVE] = 0.04  # beta of the k3 KL term (the paper's 0.04); 0 -> no KL term
    cliprange: Annotated[float, POSITIVE] = 0.2  # ratio clip range eps (binds only when epochs > 1)
    aggregation: Literal["seq_mean", "token_mean"] = "seq_mean"  # see the module docstring
    scale_rewards: bool = True  # divide by the group's std (False: Dr. GRPO)


class GRPO(OnlineAlgorithm):
    name = "grpo"
    Config = GRPOConfig
    key_metrics = ("objective/scores", "objective/kl")

    def __init__(self, cfg, policy, tokenizer, ctx):
        self.rows_per_prompt = cfg.samples_per_prompt  # every sample is a training row
        super().__init__(cfg, policy, tokenizer, ctx)

    def make_rows(self, rollout):
        advantages = grpo_advantages(rollout.scores, self.cfg.samples_per_prompt, scale=self.cfg.scale_rewards)  # (N,)
        self.rollout_metrics["frac_zero_advantage"] = (advantages == 0).float().mean()  # groups with no signal
        return rollout.batch(advantages=advantages)

    def loss(self, model, batch):
        cfg = self.cfg
        logp, _, _ = sequence_logps(model, batch, cfg.temperature, cfg.fused_logps)  # (B, R) per-token log pi
        old_logp = batch["logprobs"] if cfg.epochs > 1 else logp.detach()  # pi_old (= pi when on-policy)
        loss, clipfrac, kl = grpo_loss(logp, old_logp, batch["ref_logprobs"], batch["advantages"],
                                       batch["response_mask"], clip=cfg.cliprange, kl_coef=cfg.kl_coef,
                                       aggregation=cfg.aggregation)
        return loss, {"policy/clipfrac_avg": clipfrac, "loss/policy_avg": loss.detach(), "kl": kl,
                      **self.rollout_metrics}
