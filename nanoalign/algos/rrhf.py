"""RRHF: Rank Responses to align Human Feedback, as a pure loss function.

Yuan et al. 2023, "RRHF: Rank Responses to Align Language Models with Human Feedback without tears",
arXiv:2304.05302 (NeurIPS 2023). Reference-free. Each of the k responses y_i to a prompt x, with reward r_i, is
scored by the policy's length-normalised log-likelihood (Eq. 1)

    p_i = (1 / ||y_i||) sum_t log pi(y_{i,t} | x, y_{i,<t}),

a ranking hinge over every pair the rewards order asks the better response to score at least as high (Eq. 2)

    L_rank = sum_{r_i < r_j} max(0, p_i - p_j),

and the best response y_{i'}, i' = argmax_i r_i, is learnt with the cross-entropy (Eq. 3)
L_ft = -sum_t log pi(y_{i',t} | x, y_{i',<t}); the loss is L = L_rank + L_ft (Eq. 4).

Ties: a pair with r_i = r_j is in no hinge (Eq. 2's strict r_i < r_j); when the top reward ties, L_ft trains on all
the tied best responses. With k = 2 it is the hinge max(0, p_l - p_w) with margin 0 on average log-probs.

Gradient (derived by hand; tests/test_listwise_loss.py checks it against autograd): each pair (i worse, j better)
with p_i > p_j adds +1 to dL_rank/dp_i and -1 to dL_rank/dp_j; a correctly ordered pair adds nothing. So
dL_rank/dp_m = #{better j with p_j < p_m} - #{worse i with p_i > p_m}: the hinge stops pushing once the list is
ordered, and only L_ft keeps moving the policy (towards the best responses).

This implementation differs from the paper in:
  - L_ft is our SFT loss, the token mean of -log pi over the best response(s) of the micro-batch (algos/sft.py),
    not a sum over tokens (the released code takes a mean too); L_rank is summed over the pairs of each list and
    averaged over the lists of the micro-batch.
  - rrhf_rank_weight weighs L_rank (Eq. 4 has 1, the default; the released train.py defaults to 100).
  - length normalisation is the plain 1/||y|| (the released code's length_penalty = 1).
"""
from dataclasses import dataclass
from typing import Annotated

import torch

from nanoalign.algos.listwise import ListwiseAlgorithm, better_pairs
from nanoalign.config import NON_NEGATIVE


def rrhf_loss(avg_logps, scores, valid):
    """RRHF ranking losses (B,): Eq. 2, the sum over pairs ordered by score of max(0, p_worse - p_better).

    avg_logps: (B, K) length-normalised log pi(y|x) (Eq. 1); scores: (B, K) rewards, higher is better; valid: (B, K)
    bool, False on empty slots.
    """
    better = better_pairs(scores, valid)  # (B, K, K): [b, j, i] = r_j > r_i, i.e. i is the worse of the pair
    hinge = torch.relu(avg_logps[:, None, :] - avg_logps[:, :, None])  # (B, K, K): max(0, p_i - p_j) at [b, j, i]
    return (hinge * better).sum((-2, -1))  # (B,)


# --- Algorithm adapter: rrhf_loss on the (B, K) average log-probs (Eq. 1) + L_ft on the best (listwise.py) ---


@dataclass
class RRHFConfig:
    rrhf_rank_weight: Annotated[float, NON_NEGATIVE] = 1.0  # weight of L_rank next to L_ft (Eq. 4: 1)


class RRHF(ListwiseAlgorithm):
    name = "rrhf"
    Config = RRHFConfig
    key_metrics = ("rewards/accuracies", "nll_loss")

    def loss(self, model, batch):
        return self.ranking_plus_sft(model, batch, rrhf_loss, rank_weight=self.cfg.rrhf_rank_weight)  # Eq. 4
