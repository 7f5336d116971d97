"""Property tests of nanoalign/algos/rl_math.py with hypothesis: random shapes, lengths and coefficients.

- GAE equals the brute-force sum A_t = sum_{l >= 0} (gamma lam)^l delta_{t+l} over the valid tokens of each row, for
  right-padded masks of random lengths and random gamma, lambda;
- RLOO advantages sum to zero within each prompt's group of k samples;
- GRPO advantages are invariant to an affine shift r -> a r + b (a > 0) of a group's rewards;
- the clipped PPO surrogate has zero gradient at tokens where the clip is active.
"""
import torch
from hypothesis import given, settings, strategies as st

from nanoalign.algos.grpo import grpo_advantages
from nanoalign.algos.rl_math import gae, ppo_policy_loss
from nanoalign.algos.rloo import rloo_advantages

SETTINGS = settings(max_examples=60, deadline=None)


def brute_force_gae(rewards, values, lengths, gamma, lam):
    """A_t = sum_l (gamma lam)^l delta_{t+l}, delta_t = r_t + gamma V_{t+1} - V_t, V beyond the end = 0."""
    B, T = rewards.shape
    advantages = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        n = lengths[b]
        v = [float(values[b, t]) for t in range(n)] + [0.0]
        delta = [float(rewards[b, t]) + gamma * v[t + 1] - v[t] for t in range(n)]
        for t in range(n):
            advantages[b, t] = sum((gamma * lam) ** l * delta[t + l] for l in range(n - t))
    return advantages


@SETTINGS
@given(lengths=st.lists(st.integers(1, 9), min_size=1, max_size=4), gamma=st.floats(0.0, 1.0),
       lam=st.floats(0.0, 1.0), seed=st.integers(0, 2 ** 16))
def test_gae_equals_the_brute_force_sum(lengths, gamma, lam, seed):
    g = torch.Generator().manual_seed(seed)
    B, T = len(lengths), max(lengths) + 2  # at least two padded columns
    rewards = torch.randn(B, T, generator=g, dtype=torch.float64)
    values = torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = (torch.arange(T)[None] < torch.tensor(lengths)[:, None]).double()  # right-padded
    advantages, returns = gae(rewards * mask, values, mask, gamma, lam)
    expected = brute_force_gae(rewards, values, lengths, gamma, lam)
    assert torch.allclose(advantages, expected, atol=1e-9)
    assert torch.allclose(returns, (expected + values) * mask, atol=1e-9)
    assert torch.all(advantages[mask == 0] == 0)


@SETTINGS
@given(groups=st.integers(1, 5), k=st.integers(2, 8), seed=st.integers(0, 2 ** 16))
def test_rloo_advantages_sum_to_zero_in_each_group(groups, k, seed):
    rewards = torch.randn(groups * k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 3
    advantages = rloo_advantages(rewards, k).view(groups, k)
    assert torch.allclose(advantages.sum(1), torch.zeros(groups, dtype=torch.float64), atol=1e-9)


@SETTINGS
@given(groups=st.integers(1, 5), k=st.integers(2, 8), scale=st.floats(0.5, 20.0), shift=st.floats(-50.0, 50.0),
       seed=st.integers(0, 2 ** 16))
def test_grpo_advantages_are_invariant_to_an_affine_reward_shift(groups, k, scale, shift, seed):
    """(a r + b - mean) / std = (r - mean) / std for a > 0, up to grpo's eps in the denominator: sample j of a group
    lies in [j, j + 0.5), so every group's std is >= 0.35 and eps / (a std) stays below 6e-4 relative."""
    noise = torch.rand(groups * k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 0.5
    rewards = noise + torch.arange(groups * k, dtype=torch.float64) % k
    base = grpo_advantages(rewards, k)
    shifted = grpo_advantages(scale * rewards + shift, k)
    assert torch.allclose(base, shifted, rtol=2e-3, atol=2e-3)
    assert torch.allclose(grpo_advantages(rewards + shift, k, scale=False), grpo_advantages(rewards, k, scale=False),
                          atol=1e-9)  # Dr. GRPO: a shift alone changes nothing


@SETTINGS
@given(n=st.integers(2, 30), clip=st.floats(0.05, 0.5), seed=st.integers(0, 2 ** 16))
def test_ppo_surrogate_has_zero_gradient_where_the_clip_is_active(n, clip, seed):
    g = torch.Generator().manual_seed(seed)
    old_logp = torch.randn(1, n, generator=g, dtype=torch.float64)
    logp = (old_logp + torch.randn(1, n, generator=g, dtype=torch.float64)).requires_grad_()  # ratios far from 1
    advantages = torch.randn(1, n, generator=g, dtype=torch.float64)
    mask = torch.ones(1, n, dtype=torch.float64)
    loss, _, _ = ppo_policy_loss(logp, old_logp, advantages, mask, clip)
    (grad,) = torch.autograd.grad(loss, logp)
    ratio = torch.exp(logp.detach() - old_logp)
    clipped = ((advantages > 0) & (ratio > 1 + clip)) | ((advantages < 0) & (ratio < 1 - clip))  # min picks the clip
    assert torch.all(grad[clipped] == 0)
    assert torch.all(grad[~clipped] != 0)  # elsewhere -A rho / n: never zero for A != 0
