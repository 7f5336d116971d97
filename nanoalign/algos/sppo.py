"""SPPO: Self-Play Preference Optimization (Wu et al. 2024, "Self-Play Preference Optimization for Language Model
Alignment", arXiv:2405.00675, Sec. 4 and Algorithm 1).

Alignment as a two-player constant-sum game whose payoff is the preference P(y > y' | x); its Nash equilibrium is
approached by multiplicative weights (Hedge) on each response's win rate against the current policy pi_t:

    pi_{t+1}(y|x) = pi_t(y|x) exp(eta P(y > pi_t | x)) / Z_t(x),      P(y > pi_t | x) = E_{y' ~ pi_t} P(y > y' | x).

SPPO fits pi_{t+1} by least squares on samples of pi_t, approximating log Z_t(x) by eta / 2 (pi_t's win rate
against itself is 1/2), which is the square loss of Algorithm 1's update (sppo_loss below):

    theta_{t+1} = argmin_theta E_{x, y ~ pi_t} [ log(pi_theta(y|x) / pi_t(y|x)) - eta (P_hat(y > pi_t | x) - 1/2) ]^2.

Algorithm 1, iteration t: sample K responses y_1..y_K ~ pi_t(.|x) per prompt, ask the preference oracle for
P(y_k > y_k' | x) for every pair, estimate P_hat(y_k > pi_t | x) = 1/K sum_k' P(y_k > y_k' | x) (win_rates: the
diagonal P(y_k > y_k) = 1/2 is one of the K terms, as in the authors' scripts/compute_prob.py), and regress.

Here an iteration is one rollout (online.py): pi_t is the policy that sampled it, and log pi_t(y|x) is the rollout's
rollout.logprobs summed over the response (recomputed with one full forward, so log pi/pi_t is exactly 0 before the
first update). The rollout's rows are trained for steps_per_rollout = rollout_batch_size / batch_size * epochs
optimizer steps against that fixed pi_t (default: 4 passes of one batch; the authors' script runs 18 epochs per
iteration), then the next rollout samples pi_{t+1}. Within an iteration the square loss is what would stop the
policy (log pi/pi_t is pulled to the target and no further); at the toy world's lr 1e-4 it does not get there in 4
steps (|log pi/pi_t| ~0.1 against targets ~2, docs/iterative.md), so each iteration is close to REINFORCE with the
advantage P_hat - 1/2 scaled by 2 eta, and eta acts like a step size.

The preference oracle is Bradley-Terry on the scorer's rewards, P(a > b) = sigmoid((r_a - r_b) / sppo_tau)
(bt_preferences): on the toy world the scorer is the gold reward (train.py fills reward_model="gold"); elsewhere a
reward model (reward_model="ckpt:<dir>"). The paper's oracle is PairRM (a 0.4B pairwise ranker), and the authors'
code also turns its scores into P = sigmoid(s_i - s_j), i.e. this rule with tau = 1.

Rows: sppo_rows="best_worst" (default) keeps, per prompt, the sample of highest and the one of lowest win rate and
averages their two square losses, as the authors' code does (compute_prob.py picks chosen / rejected by the argmax /
argmin score; the trainer's loss_type="sppo" is the mean of both squares); "all" regresses all K samples
(Algorithm 1 as written).

Gradient (tests/test_iterative.py checks it): with s_i = log pi(y_i) - log pi_t(y_i) and target g_i = eta (P_i - 1/2),
L = 1/B sum_i (s_i - g_i)^2 gives dL/d log pi(y_i) = 2 (s_i - g_i) / B; at pi = pi_t (the first step of an
iteration) that is -2 eta (P_i - 1/2) / B: REINFORCE with the advantage P_i - 1/2 (the paper's policy-gradient reading
of the loss: the constant eta/2 is its baseline).

This implementation differs from the paper in:
  - the oracle: Bradley-Terry on one scalar reward is transitive, so the general (intransitive) preferences SPPO is
    built for do not occur here; sppo_tau scales the reward differences (P depends on (r_a - r_b) / tau);
  - the iteration: one rollout of rollout_batch_size rows (default batch_size) for `epochs` passes (default 4), not
    a 60k-prompt dataset for 18 epochs; K = samples_per_prompt defaults to 5 as in the paper;
  - eta defaults to 30, not the paper's 1000 (beta = 1/eta = 0.001 in the authors' script, with lr 5e-7): the toy
    world's gold rewards lie in [0, 1] with tau = 1, so P - 1/2 is ~0.05, and eta sets the target log-ratios in
    nats. On the toy world 200 steps at eta 30 hack the lexicon reward (KL 39, 3% grammatical; docs/iterative.md),
    as GRPO's and RAFT's defaults do: the frontier sweeps eta from 1;
  - log-probs are of the sampling distribution at `temperature`, summed over response tokens; there is no reference
    model pi_0 at all (as in the paper: pi_t is the only anchor), so the KL to the SFT model grows with the number
    of iterations.
KL knob: eta (larger: each iteration moves further from pi_t).
"""
from dataclasses import dataclass
from typing import Annotated, Literal

import torch

from nanoalign.algos.online import OnlineAlgorithm, OnlineConfig, sequence_logps
from nanoalign.config import AT_LEAST_1, POSITIVE, Range


def bt_preferences(rewards, k, tau=1.0):
    """P[b, i, j] = P(y_i > y_j | x_b) = sigmoid((r_i - r_j) / tau) for the k samples of each prompt (Bradley-Terry).
    rewards: (B*k,), the k samples of one prompt consecutive -> (B, k, k); the diagonal is 1/2."""
    r = rewards.view(-1, k)                                           # (B, k)
    return torch.sigmoid((r[:, :, None] - r[:, None, :]) / tau)       # (B, k, k): row i beats column j


def win_rates(preferences):
    """P_hat(y_i > pi_t | x) = 1/K sum_j P(y_i > y_j | x) (Algorithm 1; the j = i term, 1/2, included).
    preferences (B, K, K) -> (B, K)."""
    return preferences.mean(dim=2)


def sppo_loss(logps, old_logps, win_rate, eta):
    """SPPO's square loss (Wu et al. 2024, Algorithm 1): mean_i (log pi(y_i)/pi_t(y_i) - eta (P_hat_i - 1/2))^2.
    logps (B,) summed log pi(y_i | x) with gradient; old_logps (B,) the same under pi_t; win_rate (B,) P_hat_i.
    -> (loss, log-ratios (B,) detached, targets (B,))."""
    log_ratio = logps - old_logps                                     # log pi(y_i)/pi_t(y_i)  (B,)
    target = eta * (win_rate - 0.5)                                   # eta (P_hat - 1/2): log Z ~ eta / 2
    return ((log_ratio - target) ** 2).mean(), log_ratio.detach(), target


@dataclass
class SPPOConfig(OnlineConfig):
    samples_per_prompt: Annotated[int, Range(2)] = 5  # K responses per prompt (the paper: 5)
    epochs: Annotated[int, AT_LEAST_1] = 4  # passes over each iteration's rows against the same pi_t
    eta: Annotated[float, POSITIVE] = 30.0  # Hedge step size: the target log-ratio is eta (P_hat - 1/2)
    sppo_tau: Annotated[float, POSITIVE] = 1.0  # oracle temperature: P(a > b) = sigmoid((r_a - r_b) / tau)
    sppo_rows: Literal["best_worst", "all"] = "best_worst"  # per prompt: highest and lowest win rate, or all K


class SPPO(OnlineAlgorithm):
    name = "sppo"
    Config = SPPOConfig
    key_metrics = ("objective/scores", "sppo/win_rate_best")
    uses_reference = False  # no pi_0: pi_t (the rollout's own log-probs) is the only anchor

    def __init__(self, cfg, policy, tokenizer, ctx):
        self.rows_per_prompt = 2 if cfg.sppo_rows == "best_worst" else cfg.samples_per_prompt
        super().__init__(cfg, policy, tokenizer, ctx)

    @property
    def recompute_logprobs(self):
        """pi_t's log-probs from one full forward (not generate()'s incremental ones): log pi/pi_t = 0 exactly."""
        return True

    def make_rows(self, rollout):
        cfg, K = self.cfg, self.cfg.samples_per_prompt
        rates = win_rates(bt_preferences(rollout.scores, K, cfg.sppo_tau))  # (B, K)
        index = torch.arange(rates.numel(), device=rates.device).view(-1, K)  # row of each sample  (B, K)
        if cfg.sppo_rows == "best_worst":  # argmax / argmin win rate (= score): first one on ties
            index = torch.stack([index.gather(1, rates.argmax(1, keepdim=True))[:, 0],
                                 index.gather(1, rates.argmin(1, keepdim=True))[:, 0]], 1)  # (B, 2)
        index = index.reshape(-1)
        self.rollout_metrics["sppo/win_rate_best"] = rates.max(1).values.mean()
        rows = rollout.batch(win_rate=rates.reshape(-1), old_logps=rollout.logprobs.sum(1))  # (N, ...)
        return {k: v[index] for k, v in rows.items()}

    def loss(self, model, batch):
        _, logps, _ = sequence_logps(model, batch, self.cfg.temperature, self.cfg.fused_logps)  # log pi(y|x)  (B,)
        loss, log_ratio, target = sppo_loss(logps, batch["old_logps"], batch["win_rate"], self.cfg.eta)
        return loss, {"sppo/log_ratio": log_ratio.mean(), "sppo/log_ratio_abs": log_ratio.abs().mean(),
                      "sppo/target_abs": target.abs().mean(), **self.rollout_metrics}
