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
from typing import Literal

from nanoalign.algos.online import OnlineAlgorithm, OnlineConfig, sequence_logps
from nanoalign.algos.rl_math import grpo_advantages, grpo_loss


@dataclass
class GRPOConfig(OnlineConfig):
    samples_per_prompt: int = 8  # G, the group size (TRL: num_generations)
    kl_coef: float = 0.04  # beta of the k3 KL term (the paper's 0.04); 0 -> no KL term
    cliprange: float = 0.2  # ratio clip range eps (binds only when epochs > 1)
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
