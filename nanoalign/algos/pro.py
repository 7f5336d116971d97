"""Preference Ranking Optimization (PRO) as a pure loss function.

Song et al. 2023, "Preference Ranking Optimization for Human Alignment", arXiv:2306.17492 (AAAI 2024). Given a
prompt x and n completions ranked y^1 > y^2 > ... > y^n, PRO fits the policy's length-normalised log-likelihood

    r(x, y) = (1 / |y|) sum_t log pi(y_t | x, y_<t)

to the ranking with the Plackett-Luce likelihood: at each position k the best of the REMAINING candidates,
y^k, should win a softmax over y^k, ..., y^n:

    L_PRO = - sum_{k=1}^{n-1} log [ exp(r(x, y^k)) / sum_{i=k}^{n} exp(r(x, y^i)) ],

and adds the SFT loss of the best completion: L = L_PRO + beta L_SFT (the paper's objective, Figure 2 / its
"PRO" section; the n = 2 case is the Bradley-Terry / reward-model loss on r). Optionally (the paper's
"grafting RLHF onto PRO"), each term gets reward-difference temperatures: the logit of a worse candidate y^i in
term k is r(x, y^i) * (s_k - s_i) and that of y^k itself r(x, y^k) * max_{i>k} (s_k - s_i), with s the
completions' scores (pro_temperature="reward_difference"; the released code multiplies by the reward gap exactly
so, i.e. the temperature T = 1 / (s_k - s_i)).

Ties (scores that are equal): term k's candidates are y^k and the completions with a STRICTLY lower score, so tied
completions never compete; each completion with at least one worse completion gets a term. Without ties this is
the sum above; with ties it does not depend on how the tied completions were ordered.

Gradient (derived by hand; tests/test_listwise_loss.py checks it against autograd): with M_k = {k} u {i: s_i < s_k}
and q_k(j) = exp(r_j) / sum_{m in M_k} exp(r_m) the softmax of term k (no temperature),
    dL/dr_j = sum_{k: j in M_k} q_k(j) - #{k = j with a term},
so the best completion's r is pushed up by 1 - q_1(1), and each worse one down by its share of every term it is in.
For n = 2 (one term): L = -log sigmoid(r_w - r_l), dL/dr_w = -sigmoid(r_l - r_w) = -dL/dr_l.

This implementation differs from the paper in:
  - L_SFT is our SFT loss, the token mean of -log pi over the best completion(s) of the micro-batch (algos/sft.py);
    the released code uses the summed log-likelihood of y^1 averaged over the batch, weighted by
    sft_weight * (n - 1)^2. Our weight pro_sft_weight multiplies the token mean directly (see its default below).
  - a list whose best score ties trains the SFT term on all the tied best completions (the paper has one best).
  - losses are averaged over the lists of a micro-batch; each list's terms are summed (as the paper and its code).
  - no self-bootstrapping (the paper's optional extension that samples new candidates during training).
"""
import functools
from dataclasses import dataclass
from typing import Annotated, Literal

import torch

from nanoalign.algos.listwise import ListwiseAlgorithm, better_pairs
from nanoalign.config import NON_NEGATIVE

TEMPERATURES = ("none", "reward_difference")


def pro_loss(avg_logps, scores, valid, *, temperature="none"):
    """PRO ranking losses (B,): sum over positions of -log softmax over the remaining candidates (module doc).

    avg_logps: (B, K) length-normalised log pi(y|x) of every completion; scores: (B, K), higher is better; valid:
    (B, K) bool, False on empty slots of lists shorter than K. temperature: "none" | "reward_difference".
    """
    if temperature not in TEMPERATURES:
        raise ValueError(f"unknown PRO temperature {temperature!r}; choose one of {TEMPERATURES}")
    K = avg_logps.shape[-1]
    better = better_pairs(scores, valid)  # (B, K, K): [b, k, i] = y^i strictly worse than y^k
    own = torch.eye(K, dtype=torch.bool, device=avg_logps.device).expand_as(better)  # (B, K, K): i == k
    if temperature == "reward_difference":
        gap = torch.where(better, scores[:, :, None] - scores[:, None, :], 0.0)  # (B, K, K): s_k - s_i > 0 on worse i
        weights = torch.where(own, gap.amax(-1, keepdim=True), gap)  # y^k itself: the largest gap of its term
    else:
        weights = torch.ones_like(better, dtype=avg_logps.dtype)
    logits = (avg_logps[:, None, :] * weights).masked_fill(~(better | own), float("-inf"))  # (B, K, K) term k's logits
    own_logit = logits.diagonal(dim1=-2, dim2=-1)  # (B, K): y^k's own logit in term k
    terms = torch.logsumexp(logits, dim=-1) - own_logit  # (B, K): -log softmax of y^k in term k
    has_term = better.any(-1)  # (B, K): y^k beats at least one completion
    return torch.where(has_term, terms, 0.0).sum(-1)  # (B,)


# --- Algorithm adapter: pro_loss on the (B, K) average log-probs + the SFT term on the best (listwise.py) ---


@dataclass
class PROConfig:
    pro_sft_weight: Annotated[float, NON_NEGATIVE] = 1.0  # beta: weight of the token-mean NLL of the best completion
    pro_temperature: Literal[TEMPERATURES] = "none"  # "reward_difference": the paper's score-gap temperatures


class PRO(ListwiseAlgorithm):
    name = "pro"
    Config = PROConfig
    key_metrics = ("rewards/accuracies", "nll_loss")

    def loss(self, model, batch):
        ranking = functools.partial(pro_loss, temperature=self.cfg.pro_temperature)
        return self.ranking_plus_sft(model, batch, ranking, sft_weight=self.cfg.pro_sft_weight)  # L_PRO + beta L_SFT
