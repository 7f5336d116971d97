"""The pure math that online RL for language models shares (PPO's GAE and clipped losses, KL estimators and
controllers, whitening): tensors in, tensors out, no model. Each algorithm's own estimator lives in its file
(rloo.rloo_advantages, grpo.grpo_advantages / grpo_loss, raft.best_of_n_kl).

Shapes: B sequences, T response positions, V vocabulary. Every `mask` is (B, T), float or bool, 1 on
valid response tokens (the final EOS included), 0 on padding; rows are right-padded. Per-token
log-probs `logp`, `old_logp`, `ref_logp` are (B, T) log pi(y_t | x, y_<t) under the policy being
optimised, the policy that generated the rollout, and the frozen reference.

Papers: PPO (Schulman et al. 2017, arXiv:1707.06347), GAE (Schulman et al. 2016, arXiv:1506.02438),
PPO for RLHF (Ziegler et al. 2019, arXiv:1909.08593; Stiennon et al. 2020, arXiv:2009.01325; Huang
et al. 2024, "The N+ Implementation Details of RLHF with PPO", arXiv:2403.17031), RLOO (Kool et al.
2019; Ahmadian et al. 2024, arXiv:2402.14740), GRPO (Shao et al. 2024, DeepSeekMath, arXiv:2402.03300),
DAPO (Yu et al. 2025, arXiv:2503.14476), Dr. GRPO (Liu et al. 2025, arXiv:2503.20783), KL estimators
(Schulman 2020, "Approximating KL divergence", joschu.net/blog/kl-approx.html). Departures from a
paper are listed in the docstring of the function concerned.
"""

import torch
import torch.distributed as dist


def masked_mean(x, mask, dim=None):
    """Mean of x over positions where mask is 1; over everything (scalar) or along `dim`.
    An all-masked slice gives 0, not NaN (the count is clamped to 1)."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_whiten(x, mask, shift_mean=True, all_reduce=False, eps=1e-8):
    """(x - mean) / std over the valid tokens; padding is returned as 0.

    std is the unbiased (Bessel-corrected, N-1) sample std, as in TRL's masked_whiten. With
    shift_mean=False the mean is added back (only the scale changes), which is how PPO implementations
    whiten rewards (Huang et al. 2024, detail on reward whitening). all_reduce=True sums the count, the
    sum and the sum of squared deviations over all DDP ranks (two small all_reduces when
    torch.distributed is initialised; a no-op otherwise), so every rank whitens with the statistics of
    the global batch rather than of its own shard; the two passes avoid the cancellation of
    E[x^2] - E[x]^2.
    """
    mask = mask.to(x.dtype)
    sync = all_reduce and dist.is_available() and dist.is_initialized()
    stats = torch.stack([mask.sum(), (x * mask).sum()])               # [N, sum x]
    if sync:
        dist.all_reduce(stats)
    count, total = stats[0], stats[1]
    mean = total / count.clamp(min=1)                                 # mu = sum x / N
    sq_dev = (((x - mean) ** 2) * mask).sum()                         # sum (x - mu)^2
    if sync:
        dist.all_reduce(sq_dev)
    var = sq_dev / (count - 1).clamp(min=1)                           # unbiased: / (N - 1)
    whitened = (x - mean) * torch.rsqrt(var + eps)                    # (x - mu) / sigma
    if not shift_mean:
        whitened = whitened + mean                                    # keep the mean, rescale only
    return whitened * mask


def kl_penalty(logp, ref_logp, kind="k1"):
    """Per-token estimator of KL(pi || pi_ref) from tokens SAMPLED FROM pi (Schulman 2020).

    With r = pi_ref(y) / pi(y), i.e. log r = ref_logp - logp (the blog's r = p/q with q = pi):
      k1 = -log r             = logp - ref_logp          unbiased, high variance, can be negative
      k2 = (log r)^2 / 2                                 biased, low variance, >= 0
      k3 = (r - 1) - log r    = exp(ref_logp - logp) - 1 - (ref_logp - logp)
                                                         unbiased, low variance, >= 0 (DeepSeekMath Eq. 4)
    Shapes: (B, T) -> (B, T). No masking here: callers multiply by the mask.
    """
    log_ratio = ref_logp - logp                                       # log r = log pi_ref - log pi
    if kind == "k1":
        return -log_ratio                                             # k1 = -log r
    if kind == "k2":
        return 0.5 * log_ratio ** 2                                   # k2 = (log r)^2 / 2
    if kind == "k3":
        return torch.expm1(log_ratio) - log_ratio                     # k3 = (r - 1) - log r
    raise ValueError(f"unknown KL estimator {kind!r}; choose 'k1', 'k2' or 'k3'")


def ppo_rewards(scores, logp, ref_logp, mask, kl_coef, kind="k1"):
    """Per-token PPO rewards for RLHF (Ziegler et al. 2019 Sec. 2.2; Stiennon et al. 2020 Eq. 2):
    R(x, y) = r(x, y) - beta * KL, spread as -beta * kl_t on every token and the score r(x, y) added
    at the LAST valid token of each row (the EOS, or the last generated token of a truncated
    response; a penalty for a missing EOS is the caller's job). Padding receives 0.

    scores (B,), logp/ref_logp/mask (B, T) -> rewards, non_score_reward, kl, all (B, T).
    A row with no valid token gets no score. Departure: none; kind="k1" is the papers' log-ratio.
    """
    mask = mask.to(logp.dtype)
    kl = kl_penalty(logp, ref_logp, kind) * mask                      # kl_t, 0 on padding  (B, T)
    non_score_reward = -kl_coef * kl                                  # -beta * kl_t        (B, T)
    positions = torch.arange(mask.shape[1], device=mask.device)       # (T,)
    last = (positions * mask).argmax(dim=1, keepdim=True)             # index of the last valid token (B, 1)
    has_token = mask.sum(dim=1, keepdim=True) > 0                     # (B, 1)
    score = (scores.to(logp.dtype).unsqueeze(1) * has_token)          # (B, 1)
    rewards = non_score_reward.scatter_add(1, last, score)             # r_T += score at the EOS
    return rewards, non_score_reward, kl


@torch.no_grad()
def gae(rewards, values, mask, gamma=1.0, lam=0.95):
    """Generalised Advantage Estimation (Schulman et al. 2016 Eq. 16; PPO paper Eqs. 11-12).

        delta_t = r_t + gamma * V_{t+1} - V_t,      A_t = delta_t + gamma * lam * A_{t+1}
        returns_t = A_t + V_t                        (the lambda-return, the value target)

    rewards, values, mask: (B, T) -> advantages, returns: (B, T), zero where mask is 0; no gradient.
    The episode ends at the last valid token: V and A beyond it are 0. Masked positions are skipped,
    not treated as time steps: "t+1" is the next VALID token, so a mask with holes (e.g. tool output
    inside a response) chains the valid tokens; for the usual right-padded mask this is the textbook
    recursion. Loop over T, vectorised over B.
    """
    mask = mask.bool()
    next_value = torch.zeros_like(values[:, 0])                       # V_{t+1}, 0 past the end  (B,)
    next_adv = torch.zeros_like(values[:, 0])                         # A_{t+1}, 0 past the end  (B,)
    advantages = []
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]     # delta_t = r_t + gamma*V_{t+1} - V_t
        adv = delta + gamma * lam * next_adv                          # A_t = delta_t + gamma*lam*A_{t+1}
        valid = mask[:, t]
        next_adv = torch.where(valid, adv, next_adv)                  # skip masked steps
        next_value = torch.where(valid, values[:, t], next_value)
        advantages.append(torch.where(valid, adv, torch.zeros_like(adv)))
    advantages = torch.stack(advantages[::-1], dim=1)                 # (B, T)
    returns = (advantages + values) * mask                            # R_t = A_t + V_t
    return advantages, returns


def ppo_policy_loss(logp, old_logp, advantages, mask, clip=0.2):
    """PPO clipped surrogate (Schulman et al. 2017 Eq. 7), negated to a loss:

        L = -mean_t min(rho_t A_t, clip(rho_t, 1-eps, 1+eps) A_t),   rho_t = pi(y_t) / pi_old(y_t)

    logp, old_logp, advantages, mask: (B, T) -> loss, clipfrac, approxkl (scalars; the last two detached).
    Aggregation: the mean over ALL valid tokens of the batch (token mean), as in OpenAI's
    lm-human-preferences and TRL (Huang et al. 2024). Departure: the mean is over the tokens of the
    (micro-)batch it is given; with gradient accumulation the trainer averages micro-batch means.
    clipfrac = fraction of tokens where the clipped term is the active one (zero gradient there);
    approxkl = mean 0.5 (log rho)^2 over the valid tokens, the k2 estimate of KL(pi_old || pi) that TRL
    logs (TRL 1.12 averages it over every position, padding included, which dilutes it).
    """
    log_ratio = logp - old_logp                                       # log rho_t  (B, T)
    ratio = torch.exp(log_ratio)                                      # rho_t      (B, T)
    unclipped = -advantages * ratio                                   # -rho_t A_t
    clipped = -advantages * ratio.clamp(1.0 - clip, 1.0 + clip)       # -clip(rho_t) A_t
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)       # -min(.,.) = max(-., -.)
    clipfrac = masked_mean((clipped > unclipped).float(), mask).detach()
    approxkl = masked_mean(0.5 * log_ratio.detach() ** 2, mask)       # k2 of KL(pi_old || pi)
    return loss, clipfrac, approxkl


def ppo_value_loss(values, old_values, returns, mask, clip=0.2):
    """Clipped value loss (PPO as implemented in OpenAI baselines / lm-human-preferences; the PPO
    paper's Eq. 9 uses the plain squared error (V - R)^2):

        L = 0.5 * mean_t max((V_t - R_t)^2, (clip(V_t, V_old - eps, V_old + eps) - R_t)^2)

    values, old_values, returns, mask: (B, T) -> loss, clipfrac (scalars; clipfrac detached).
    Token mean over valid tokens as in ppo_policy_loss. clip is in the units of the reward.
    """
    clipped_values = old_values + (values - old_values).clamp(-clip, clip)  # V_old + clip(V - V_old)
    unclipped_err = (values - returns) ** 2                           # (V - R)^2
    clipped_err = (clipped_values - returns) ** 2                     # (V_clip - R)^2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_err, clipped_err), mask)
    clipfrac = masked_mean((clipped_err > unclipped_err).float(), mask).detach()
    return loss, clipfrac


class FixedKLController:
    """A constant KL coefficient beta with the AdaptiveKLController interface."""

    def __init__(self, kl_coef):
        self.value = kl_coef

    def update(self, current_kl, n_steps):
        pass


class AdaptiveKLController:
    """Log-space proportional controller for beta (Ziegler et al. 2019, Sec. 2.2):

        e_t = clip((KL_t - KL_target) / KL_target, -0.2, 0.2),   beta_{t+1} = beta_t (1 + K_beta e_t)

    with K_beta = n_steps / horizon as in the authors' code (lm-human-preferences): n_steps is the
    number of episodes since the last update, so beta moves by up to 20% per `horizon` episodes.
    current_kl is the mean per-SEQUENCE KL (summed over tokens), like the target.
    """

    def __init__(self, init_kl_coef, target, horizon):
        self.value, self.target, self.horizon = init_kl_coef, target, horizon

    def update(self, current_kl, n_steps):
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)   # e_t = clip(KL/KL_target - 1, +-0.2)
        self.value *= 1.0 + error * n_steps / self.horizon            # beta *= 1 + K_beta e_t


def entropy_from_logits(logits):
    """Entropy of the softmax of each position: H = logsumexp(z) - sum_v softmax(z)_v z_v.
    logits (..., V) -> (..., ) float32."""
    logits = logits.float()
    probs = torch.softmax(logits, dim=-1)                             # p_v  (..., V)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(dim=-1)  # H = log Z - E_p[z]
