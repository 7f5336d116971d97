"""Direct Reward Optimization with a learned value (DRO-V), on single-trajectory feedback (x, y, r).

Richemond, Tang, Guo, Calandriello, Azar, Rafailov, Avila Pires, Tarassov, Spangher, Ellsworth, Severyn, Mallinson,
Shani, Shamir, Joshi, Liu, Munos, Piot 2024, "Offline Regularised Reinforcement Learning for Large Language Models
Alignment", arXiv:2405.19107 (equation numbers here are those of arXiv v1). Instead of pairs, each example is one
answer y to a prompt x with a scalar reward r. The optimum of the KL-regularised objective (Eq. 1 of the paper),
pi*(y|x) = pi_ref(y|x) exp(r(x, y) / tau) / Z(x) (Eq. 2), satisfies r(x, y) = V*(x) + tau log pi*(y|x) / pi_ref(y|x)
with V*(x) = tau log Z(x) for EVERY y (Eq. 3), so DRO fits both with one squared residual over the offline data (the
DRO loss, Eq. 4):

    L(theta, phi) = 1/2 E_{(x, y, r)} [ (r - V_phi(x) - tau log pi_theta(y|x) / pi_ref(y|x))^2 ],

whose unique minimiser is (pi*, V*) (the paper's Theorem 1, given equal supports of the data and pi_ref). DRO-V takes
a gradient step on each of theta and phi: the value gradient is Eq. 7, and the policy gradient Eq. 8 divided by tau,
the rescaling the paper applies in practice (its Algorithm 1):

    policy:  -E[ grad log pi(y|x) (r - V(x)) ] + tau/2 grad E[ (log pi(y|x) / pi_ref(y|x))^2 ]     (Eq. 8 / tau)
    value:    E[ (V(x) - r + tau log pi(y|x) / pi_ref(y|x)) grad V(x) ]                          (Eq. 7)

As losses with stop-gradients sg (dro_loss below): L_pi = -(r - sg(V)) log pi + tau/2 L^2 with L the log-ratio,
L_V = 1/2 (r - V - tau sg(L))^2, and the step minimises L_pi + value_coef * L_V.
Gradients (derived by hand; tests/test_negative_loss.py checks them against autograd):
    dL_pi/dlog pi = -(r - V) + tau L,      dL_V/dV = -(r - V - tau L) = V - r + tau L.
Both vanish exactly at r = V + tau L, the optimum's identity above (Eq. 3).

Data: the binary format {"prompt","completion","label"} (a preference file is unpaired first, as for KTO), with the
reward r = 1 for a desirable answer (label true) and r = 0 for an undesirable one, the paper's own example of
thumbs up / down (its Section 2): the toy world's binary.jsonl has no scalar reward field. Every row is used.

This implementation differs from the paper in:
  - the value network V(x) is a scalar head on a copy of the policy's transformer (model.RewardModel on the SFT
    weights, a fresh head, the same shape as PPO's separate critic), read at the last prompt token, so V sees x only
    (a causal model's hidden state there does not depend on y; an empty prompt without a BOS token has no such
    position, and V is read after the first answer token instead). The paper's DRO-V also uses a separate value
    network (Section 3.3, where one value shared by the whole batch does worse than many); its initialisation and
    size are ours. The value's learning rate is the policy's (one optimizer; the paper updates theta and phi
    separately, both at 1e-4 by default, Section 4); `value_coef` scales its loss instead.
  - the rewards are binary labels, not the paper's experimental rewards: those are UltraFeedback's scalar scores,
    normalised to mean 0 and variance 1 over the dataset (its Section 4).
  - both losses are means over each micro-batch (as Algorithm 1; Eqs. 7 and 8 write sums); log pi is SUMMED over the
    answer's tokens (the paper's sequence log-likelihood), and pi_ref's log-probs are precomputed once before
    training (as for DPO).
"""
import copy
from dataclasses import dataclass
from typing import Annotated

import torch.nn as nn

from nanoalign.algos.kto import load_binary, side_mean
from nanoalign.config import NON_NEGATIVE, POSITIVE
from nanoalign.logps import batch_logps
from nanoalign.model import RewardModel
from nanoalign.reference import Reference, precompute
from nanoalign.trainer import Algorithm


def dro_loss(logps, ref_logps, values, rewards, *, tau=1.0):
    """DRO-V's policy losses (B,), value losses (B,) and the detached residual r - V - tau L (B,).

    logps, ref_logps: (B,) summed log pi(y|x), log pi_ref(y|x); values: (B,) V(x); rewards: (B,) r(x, y).
    """
    logratios = logps - ref_logps  # L = log pi(y|x) / pi_ref(y|x), (B,)
    advantages = rewards - values.detach()  # r - sg(V(x)), (B,)
    policy_losses = -advantages * logps + tau / 2 * logratios ** 2  # grad: -(r - V) grad log pi + tau L grad L
    residuals = rewards - values - tau * logratios.detach()  # r - V - tau sg(L), (B,)
    value_losses = residuals ** 2 / 2  # grad: -(r - V - tau L) grad V
    return policy_losses, value_losses, residuals.detach()


class PolicyAndValue(nn.Module):
    """The trained module: the policy and the value network V(x), both run in ONE forward (DDP sees one forward)."""

    def __init__(self, policy, value):
        super().__init__()
        self.policy, self.value = policy, value

    def forward(self, input_ids, attention_mask, loss_mask, fused=True):
        """-> summed completion log-probs (B,) under the policy and V(x) (B,), read at the last prompt token."""
        logps, _, _ = batch_logps(self.policy, input_ids, loss_mask, attention_mask, fused=fused)  # (B,)
        last_prompt = (loss_mask.argmax(1) - 1).clamp(min=0)  # (B,) the position before the first answer token
        values = self.value.token_values(input_ids, attention_mask)  # (B, T) the head at every position
        return logps, values.gather(1, last_prompt[:, None])[:, 0]  # (B,), (B,)


@dataclass
class DROConfig:
    tau: Annotated[float, POSITIVE] = 1.0  # KL strength tau: the optimum is pi_ref exp(r / tau) / Z
    value_coef: Annotated[float, NON_NEGATIVE] = 1.0  # weight of the value loss next to the policy loss


class DRO(Algorithm):
    name = "dro"
    Config = DROConfig
    data_format = "binary"
    key_metrics = ("loss/value_avg", "logratio/mean")

    def __init__(self, cfg, policy, tokenizer, ctx):
        super().__init__(cfg, policy, tokenizer, ctx)
        self.examples = load_binary(cfg.data, tokenizer, self.max_len, self.log)
        self.eval_examples = load_binary(cfg.eval_data, tokenizer, self.max_len, self.log) if cfg.eval_data else []
        for examples in (self.examples, self.eval_examples):
            for e in examples:
                e["reward"] = float(e["label"])  # r = 1 for a desirable answer, 0 for an undesirable one
        self.reference = Reference(policy, copy=False, fused=cfg.fused_logps, dtype=ctx.inference_dtype)
        for examples in (self.examples, self.eval_examples):  # pi_ref = the policy before any step
            precompute(examples, ("ref_logps",), self.reference_logps, self.collate, ctx)
        self.reference = None  # the initial weights are not needed any more
        self.module = PolicyAndValue(policy, RewardModel(copy.deepcopy(policy)))  # value: SFT trunk, fresh head

    def reference_logps(self, batch):
        return {"ref_logps": self.reference.logps(batch["input_ids"], batch["loss_mask"])}

    def state_dict(self):
        return {"policy_prefix": "policy."}  # where the policy's weights sit in the checkpoint

    def loss(self, model, batch):
        logps, values = model(batch["input_ids"], batch["attention_mask"], batch["loss_mask"], self.cfg.fused_logps)
        policy_losses, value_losses, residuals = dro_loss(logps, batch["ref_logps"], values, batch["reward"],
                                                          tau=self.cfg.tau)
        good = batch["label"]  # (B,) bool
        loss = policy_losses.mean() + self.cfg.value_coef * value_losses.mean()
        return loss, {"loss/policy_avg": policy_losses.detach().mean(), "loss/value_avg": value_losses.detach().mean(),
                      "value/mean": values.detach().mean(), "residual/mean": residuals.mean(),
                      "logratio/mean": (logps - batch["ref_logps"]).detach().mean(),
                      "logps/chosen": side_mean(logps[good].detach()),
                      "logps/rejected": side_mean(logps[~good].detach())}
