"""LiPO-lambda: listwise preference optimisation with LambdaRank weights, as a pure loss function.

Liu et al. 2024, "LiPO: Listwise Preference Optimization through Learning-to-Rank", arXiv:2402.01878. Each of the
K responses y_i to a prompt x has a label psi_i (its score, higher is better) and the DPO implicit reward
(Eq. 2 of the paper; equation numbers here are those of arXiv v3)

    s_i = beta log pi(y_i|x) / pi_ref(y_i|x).

LiPO-lambda (Eq. 8 of the paper, the LambdaLoss objective of Wang et al. 2018) is a pairwise logistic loss over every
pair the labels order, each pair weighted by how much swapping it changes the list's DCG (Delta, G and D are defined
in the text under Eq. 8; the paper writes -log sigmoid(s_i - s_j) as log(1 + exp(-(s_i - s_j)))):

    L = - sum_{psi_i > psi_j} Delta_ij log sigmoid(s_i - s_j),
    Delta_ij = |G_i - G_j| * |1/D(tau(i)) - 1/D(tau(j))|,   G_i = 2^psi_i - 1,   D(tau) = log2(1 + tau),

where tau(i) is the rank of y_i (1 = top) in the order the CURRENT rewards s put the list in. Delta is a weight, not
differentiated (it is piecewise constant in s). With K = 2 the two ranks are always 1 and 2, so
Delta = |G_w - G_l| (1 - 1/log2 3) is a constant and the loss is DPO's (Eq. 7 of Rafailov et al.) times it; Delta = 1
for every pair gives the paper's pair-logistic loss (its Eq. 5), which is DPO's on all pairs.

Gradient (derived by hand; tests/test_listwise_loss.py checks it against autograd): with Delta fixed,
    dL/ds_m = - sum_{j: psi_m > psi_j} Delta_mj sigmoid(s_j - s_m) + sum_{i: psi_i > psi_m} Delta_im sigmoid(s_m - s_i),
and dL/dlog pi(y_m|x) = beta dL/ds_m (log pi_ref carries no gradient).

Ties: a pair with psi_i = psi_j is in no term (and |G_i - G_j| = 0 anyway). Ties in s (every s is 0 at the first
step, where pi = pi_ref) are broken by the label, better first, so tau starts as the ideal order and Delta > 0;
completions tied in both s and psi share a rank.

This implementation differs from the paper in:
  - the discount is log base 2, as in NDCG (top rank: 1/D = 1); the paper writes log(1 + tau). The base only scales
    every Delta by one constant (ln 2), i.e. the learning rate.
  - labels are the data's scores as given; a "ranking" row (best first) gets psi = k-1, ..., 1, 0 (data.py). The paper
    assumes psi in [0, 1] (its Section 2.2; its experiments use each response's mean win probability under a pairwise
    reward model). The gains 2^psi - 1 depend on the scores' scale: the toy world's annotator scores lie around 0-1,
    so its gain gaps are below 1 and beta / lr play the role they play in DPO; a ranking row of k > 2 leaves [0, 1].
  - losses are summed over the pairs of a list and averaged over the lists of a micro-batch.
  - reference log-probs are precomputed once before training (ref_logps="precompute", default) or kept live, as
    in algos/dpo.py (nanoalign.reference).
"""
from dataclasses import dataclass
from typing import Annotated, Literal

import torch
import torch.nn.functional as F

from nanoalign.algos.listwise import ListwiseAlgorithm, better_pairs, ranking_metrics, to_slots
from nanoalign.config import POSITIVE
from nanoalign.reference import Reference, precompute


def lambda_weights(rewards, scores, valid):
    """Delta_ij (B, K, K) of the module doc, from detached rewards s (B, K), labels psi (B, K) and valid (B, K)."""
    s = rewards.detach()
    higher = s[:, None, :] > s[:, :, None]  # (B, K, K): [b, i, j] = s_j > s_i
    tie_won = (s[:, None, :] == s[:, :, None]) & (scores[:, None, :] > scores[:, :, None])  # s_j = s_i, psi_j > psi_i
    above = higher | tie_won  # y_j is ranked above y_i
    tau = 1 + (above & valid[:, None, :]).sum(-1)  # (B, K): rank of y_i under s, ties broken by psi, 1 = top
    gain = torch.pow(2.0, scores) - 1  # G_i = 2^psi_i - 1, (B, K)
    inverse_discount = 1 / torch.log2(1 + tau.to(s.dtype))  # 1 / D(tau(i)), (B, K)
    return ((gain[:, :, None] - gain[:, None, :]).abs()  # |G_i - G_j|, (B, K, K)
            * (inverse_discount[:, :, None] - inverse_discount[:, None, :]).abs())  # |1/D(tau_i) - 1/D(tau_j)|


def lipo_loss(policy_logps, ref_logps, scores, valid, *, beta=0.1):
    """LiPO-lambda losses (B,) and the detached rewards s (B, K).

    policy_logps, ref_logps: (B, K) summed log pi(y|x), log pi_ref(y|x); scores: (B, K) labels psi, higher is
    better; valid: (B, K) bool, False on empty slots.
    """
    rewards = beta * (policy_logps - ref_logps)  # s_i = beta log pi/pi_ref, (B, K)
    better = better_pairs(scores, valid)  # (B, K, K): psi_i > psi_j
    delta = lambda_weights(rewards, scores, valid)  # (B, K, K), no gradient
    pair_losses = -F.logsigmoid(rewards[:, :, None] - rewards[:, None, :])  # (B, K, K): -log sigmoid(s_i - s_j)
    return (torch.where(better, delta * pair_losses, 0.0)).sum((-2, -1)), rewards.detach()


# --- Algorithm adapter: batch -> (B, K) policy and reference log-probs -> lipo_loss ---
# Reference log-probs are stored on each example as ref_logps_0, ..., ref_logps_{K-1} (K = the longest list of
# the data; 0 in the empty slots), so reference.precompute stores them as it stores DPO's two per pair.


@dataclass
class LiPOConfig:
    beta: Annotated[float, POSITIVE] = 0.1  # inverse KL strength in s = beta log pi/pi_ref (as DPO's beta)
    ref_logps: Literal["precompute", "live"] = "precompute"  # reference log-probs once before training, or a live model


class LiPO(ListwiseAlgorithm):
    name = "lipo"
    Config = LiPOConfig

    def __init__(self, cfg, policy, tokenizer, ctx):
        super().__init__(cfg, policy, tokenizer, ctx)
        longest = max(len(e["scores"]) for e in self.examples + self.eval_examples)
        self.ref_names = tuple(f"ref_logps_{j}" for j in range(longest))
        self.reference = Reference(policy, copy=cfg.ref_logps == "live", fused=cfg.fused_logps)
        if cfg.ref_logps == "precompute":
            for examples in (self.examples, self.eval_examples):
                precompute(examples, self.ref_names, self.reference_logps, self.collate, ctx)
            self.reference = None  # the initial weights are not needed any more
            self.log(f"lipo: reference log-probs precomputed for {len(self.examples) + len(self.eval_examples)} lists")

    def reference_logps(self, batch):
        """{"ref_logps_j": (B,)}: log pi_ref of completion j of every list (0 where the list is shorter)."""
        slots = to_slots(self.reference.logps(batch["input_ids"], batch["loss_mask"]), batch["valid"])  # (B, K)
        padded = F.pad(slots, (0, len(self.ref_names) - slots.shape[1]))  # (B, longest)
        return dict(zip(self.ref_names, padded.unbind(1)))

    def loss(self, model, batch):
        logps, _ = self.list_logps(model, batch)  # (B, K)
        scores, valid = batch["scores"], batch["valid"]
        K = scores.shape[1]
        ref = batch if self.ref_names[0] in batch else self.reference_logps(batch)
        ref_logps = torch.stack([ref[name] for name in self.ref_names[:K]], 1)  # (B, K)
        losses, rewards = lipo_loss(logps, ref_logps, scores, valid, beta=self.cfg.beta)
        return losses.mean(), ranking_metrics(rewards, logps.detach(), scores, valid)
