"""Direct Preference Optimization (DPO) and its pairwise relatives, as one pure loss function.

DPO: Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly a
Reward Model", arXiv:2305.18290. The KL-regularised RL optimum pi* = pi_ref exp(r / beta) / Z(x)
turns the reward into r(x, y) = beta log pi(y|x) / pi_ref(y|x) + beta log Z(x); put into the
Bradley-Terry model p(y_w > y_l) = sigmoid(r_w - r_l), Z(x) cancels and the reward-model loss
becomes a loss on the policy (Eq. 7):

    L_DPO = -log sigmoid(beta * h),   h = log pi(y_w)/pi_ref(y_w) - log pi(y_l)/pi_ref(y_l).

Each variant below changes the function of h, what h is made of, or adds a term next to it. Notation:
c, r = summed log pi(y_w|x), log pi(y_l|x) (`chosen_logps`, `rejected_logps`); c0, r0 = the same
under pi_ref; n_w, n_l = completion lengths (`chosen_counts`, `rejected_counts`); s = sigmoid;
eps = `label_smoothing`.

  "sigmoid"  DPO Eq. 7; with eps > 0 conservative DPO (cDPO, Mitchell 2023, "A note on DPO with
             noisy preferences", Eq. 3): L = -(1-eps) log s(beta h) - eps log s(-beta h).
  "robust"   robust DPO (rDPO, Chowdhury et al. 2024, "Provably Robust DPO", arXiv:2403.00409):
             the unbiased loss under label flips with rate eps < 1/2,
             L = [-(1-eps) log s(beta h) + eps log s(-beta h)] / (1 - 2 eps).
  "ipo"      IPO (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from
             Human Preferences", arXiv:2310.12036, Eq. 17): L = (h - 1/(2 beta))^2.
  "hinge"    SLiC-HF rank-calibration loss (Zhao et al. 2023, arXiv:2305.10425), written as RSO
             (Liu et al. 2023, arXiv:2309.06657) and TRL write it: L = max(0, 1 - beta h), a hinge
             with margin 1/beta on the reference-normalised margin h.
  "rdpo"     R-DPO (Park et al. 2024, "Disentangling Length from Quality in DPO",
             arXiv:2403.19159): rewarding r - alpha |y| gives L = -log s(beta h + alpha (n_w - n_l)).
  "dpop"     DPO-Positive (Pal et al. 2024, "Smaug", arXiv:2402.13228, Eq. 3):
             L = -log s(beta (h - lambda max(0, c0 - c))), penalising a fall of log pi(y_w) below pi_ref.
             lambda defaults to 1, not the paper's 50 (see the departures below).
  "simpo"    SimPO (Meng et al. 2024, arXiv:2405.14734, Eq. 6), reference-free:
             L = -log s(beta (c/n_w - r/n_l) - gamma); its beta is ~2-10, far above DPO's ~0.1
             (averaged log-ratios are small); gamma defaults to TRL's 0.5.
  "cpo"      CPO (Xu et al. 2024, "Contrastive Preference Optimization", arXiv:2401.08417), the
             preference term L_prefer, reference-free: L = -log s(beta (c - r)).

Gradients (derived by hand; tests/test_dpo_loss.py checks them against autograd). With z the
argument of the log-sigmoid, d(-log s(z))/dz = -s(-z); for the pure-h losses dL/dc = dL/dh and
dL/dr = -dL/dh:
  sigmoid  dL/dh = -beta [(1-eps) s(-beta h) - eps s(beta h)]      (eps=0: -beta s(-beta h))
  robust   dL/dh = -beta [(1-eps) s(-beta h) + eps s(beta h)] / (1 - 2 eps)
  ipo      dL/dc = 2 (h - 1/(2 beta)) / n_w,   dL/dr = -2 (h - 1/(2 beta)) / n_l
  hinge    dL/dh = -beta if beta h < 1 else 0
  rdpo     dL/dh = -beta s(-z),  z = beta h + alpha (n_w - n_l)
  dpop     dL/dc = -beta s(-z) (1 + lambda [c < c0]),  dL/dr = beta s(-z),  z = beta (h - lambda max(0, c0 - c))
  simpo    dL/dc = -beta s(-z) / n_w,  dL/dr = beta s(-z) / n_l,  z = beta (c/n_w - r/n_l) - gamma
  cpo      dL/dc = -beta s(-beta (c - r)),  dL/dr = +beta s(-beta (c - r))
The DPO weight s(-beta h) is large exactly when the implicit reward model orders the pair wrongly.

This implementation differs from the papers in:
  - log-probs are SUMS over completion tokens (as in the DPO paper) except for "ipo" and "simpo",
    which use per-token AVERAGES c/n_w: SimPO defines its reward that way; for IPO this follows TRL
    (IPO Eq. 17 itself is written on whole-sequence log-ratios), because summed log-ratios of long
    sequences sit far from the 1/(2 beta) target.
  - rewards returned for logging are beta * (log-ratio the loss used): summed for most types,
    averaged for "ipo"; for the reference-free "simpo"/"cpo" they are beta * log pi (averaged for
    simpo), as in TRL's CPOTrainer. They never carry gradient.
  - DPO-Positive's lambda defaults to 1, not the paper's 50 (TRL has no DPOP loss). When the two answers of a
    pair are similar (on the toy world, two samples of one model) DPO lowers both log-probs together, and a
    lambda >> 1 makes every such step cost more than the margin it buys, so the policy stays at the reference;
    lambda = 1 prices a nat of lost log pi(y_w) like a nat of margin. Pass --dpop_lambda=50 for the paper's
    setting. The lambda sweep on the toy world: docs/dpo.md.
  - the NLL terms of CPO (L_NLL on y_w) and of RPO (Pang et al. 2024, "Iterative Reasoning
    Preference Optimization", arXiv:2404.19733: DPO + alpha * NLL of y_w / |y_w|) are added by the
    Algorithm adapter (bottom of this file), not here: this function covers only the
    preference part.
  - IPO's regularisation strength tau is our beta (the target margin is 1/(2 tau)).
  - SLiC-HF's own hinge is max(0, delta - c + r) on raw log-probs plus a cross-entropy
    regulariser; "hinge" uses the reference-normalised h and no regulariser (RSO / TRL form).
  - label smoothing is only defined for "sigmoid" (cDPO) and "robust"; other types reject it.
"""
from dataclasses import dataclass
from typing import Annotated, Literal

import torch
import torch.nn.functional as F

from nanoalign.algos.sft import sft_loss
from nanoalign.config import NON_NEGATIVE, POSITIVE, Range
from nanoalign.logps import batch_logps
from nanoalign.reference import Reference, precompute
from nanoalign.trainer import Algorithm

LOSS_TYPES = ("sigmoid", "robust", "ipo", "hinge", "rdpo", "dpop", "simpo", "cpo")
REFERENCE_FREE = ("simpo", "cpo")  # h is built from log pi alone, no pi_ref
PER_TOKEN = ("ipo", "simpo")  # log-probs are divided by the completion length first
NEEDS_COUNTS = ("ipo", "simpo", "rdpo")


def preference_loss(chosen_logps, rejected_logps, ref_chosen_logps=None, ref_rejected_logps=None, *,
                    loss_type="sigmoid", beta=0.1, label_smoothing=0.0, chosen_counts=None,
                    rejected_counts=None, rdpo_alpha=0.0, dpop_lambda=1.0, simpo_gamma=0.5):
    """Per-pair losses (B,) and detached rewards (B,), (B,) of one DPO-family loss (see module doc).

    chosen_logps, rejected_logps: (B,) summed log pi(y|x) under the policy; ref_*: the same under
    pi_ref (unused, may be None, for "simpo"/"cpo"); chosen_counts, rejected_counts: (B,) completion
    token counts, required by "ipo", "simpo" and "rdpo".
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; choose one of {LOSS_TYPES}")
    if label_smoothing and loss_type not in ("sigmoid", "robust"):
        raise ValueError(f"label_smoothing is defined for 'sigmoid' and 'robust' only, not {loss_type!r}")
    if loss_type in NEEDS_COUNTS and (chosen_counts is None or rejected_counts is None):
        raise ValueError(f"loss_type {loss_type!r} needs chosen_counts and rejected_counts")
    if loss_type not in REFERENCE_FREE and (ref_chosen_logps is None or ref_rejected_logps is None):
        raise ValueError(f"loss_type {loss_type!r} needs the reference log-probs")
    if loss_type in REFERENCE_FREE:
        chosen_ratios, rejected_ratios = chosen_logps, rejected_logps  # log pi(y|x): no reference
    else:
        chosen_ratios = chosen_logps - ref_chosen_logps  # log pi(y_w|x)/pi_ref(y_w|x), (B,)
        rejected_ratios = rejected_logps - ref_rejected_logps  # log pi(y_l|x)/pi_ref(y_l|x), (B,)
    if loss_type in PER_TOKEN:  # per-token averages: log-ratio / |y|
        chosen_ratios = chosen_ratios / chosen_counts.clamp(min=1)
        rejected_ratios = rejected_ratios / rejected_counts.clamp(min=1)
    h = chosen_ratios - rejected_ratios  # the log-ratio margin, (B,)
    eps = label_smoothing
    if loss_type == "sigmoid":  # -(1-eps) log s(beta h) - eps log s(-beta h)
        losses = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    elif loss_type == "robust":  # [-(1-eps) log s(beta h) + eps log s(-beta h)] / (1 - 2 eps)
        losses = (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    elif loss_type == "ipo":  # (h - 1/(2 beta))^2
        losses = (h - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":  # max(0, 1 - beta h)
        losses = torch.relu(1 - beta * h)
    elif loss_type == "rdpo":  # -log s(beta h + alpha (|y_w| - |y_l|))
        losses = -F.logsigmoid(beta * h + rdpo_alpha * (chosen_counts - rejected_counts))
    elif loss_type == "dpop":  # -log s(beta (h - lambda max(0, log pi_ref(y_w) - log pi(y_w))))
        losses = -F.logsigmoid(beta * (h - dpop_lambda * torch.relu(ref_chosen_logps - chosen_logps)))
    elif loss_type == "simpo":  # -log s(beta (avg log pi(y_w) - avg log pi(y_l)) - gamma)
        losses = -F.logsigmoid(beta * h - simpo_gamma)
    else:  # "cpo": -log s(beta (log pi(y_w) - log pi(y_l)))
        losses = -F.logsigmoid(beta * h)
    return losses, beta * chosen_ratios.detach(), beta * rejected_ratios.detach()


# --- The algorithm: batch -> policy and reference log-probs -> preference_loss ---
#
# The adapter turns a micro-batch into the tensors above. Reference log-probs (pi_ref = the policy's initial
# weights) are computed ONCE for the whole dataset before the first step (ref_logps="precompute", the default):
# no grad, eval mode, the run's autocast, micro-batches; under DDP each rank computes a strided shard and the
# shards are all-gathered, so every rank holds every value. They are stored on the examples as ref_chosen_logps /
# ref_rejected_logps (collate stacks them) and no copy of the model is kept. ref_logps="live" keeps a frozen copy
# instead and runs it on every micro-batch. "simpo" and "cpo" need no reference at all.
# The NLL term (rpo_alpha) is the token mean of -log pi over the micro-batch's chosen completion tokens, as our SFT
# loss; TRL 1.16 (no rpo_alpha: loss_type=["sigmoid", "sft"], loss_weights=[1, alpha]) computes the same mean.
# logps/* report SUMMED log-probs for every loss type, as TRL's DPOTrainer. Comparison with TRL: docs/dpo.md.


@dataclass
class PreferenceLossConfig:
    """The keys of preference_loss, shared by offline DPO and online DPO."""
    beta: Annotated[float, POSITIVE] = 0.1  # inverse KL strength (DPO beta; IPO tau; SimPO beta)
    loss_type: Literal[LOSS_TYPES] = "sigmoid"  # see the module docstring
    label_smoothing: Annotated[float, Range(0, 0.5, high_open=True)] = 0.0  # cDPO / robust DPO: assumed label-flip rate eps
    rdpo_alpha: float = 0.0  # R-DPO length weight alpha
    dpop_lambda: Annotated[float, NON_NEGATIVE] = 1.0  # DPO-Positive penalty lambda (the paper: 50; see the module docstring)
    simpo_gamma: float = 0.5  # SimPO target margin gamma


def preference_loss_kwargs(cfg):
    """preference_loss's keyword arguments from a run config, checked now (a bad combination fails before training)."""
    kwargs = {f: getattr(cfg, f) for f in ("loss_type", "beta", "label_smoothing", "rdpo_alpha", "dpop_lambda",
                                            "simpo_gamma")}
    one = torch.ones(1)
    preference_loss(one, one, one, one, chosen_counts=one, rejected_counts=one, **kwargs)
    return kwargs


@dataclass
class DPOConfig(PreferenceLossConfig):
    rpo_alpha: Annotated[float, NON_NEGATIVE] = 0.0  # weight of the NLL of the chosen answer (RPO; CPO's L_NLL with 1.0)
    ref_logps: Literal["precompute", "live"] = "precompute"  # reference log-probs once before training, or a live model


class DPO(Algorithm):
    name = "dpo"
    Config = DPOConfig
    data_format = "preference"
    key_metrics = ("rewards/accuracies", "rewards/margins")

    def __init__(self, cfg, policy, tokenizer, ctx):
        super().__init__(cfg, policy, tokenizer, ctx)
        self.name = cfg.algo  # the variant's registry name (ipo, simpo, ...) on the progress bar and in checkpoints
        self.loss_kwargs = preference_loss_kwargs(cfg)
        self.examples, self.eval_examples = self.load_data("preference")
        self.reference = None
        if cfg.loss_type not in REFERENCE_FREE:
            self.reference = Reference(policy, copy=cfg.ref_logps == "live", fused=cfg.fused_logps,
                                       dtype=ctx.inference_dtype)
            if cfg.ref_logps == "precompute":
                for examples in (self.examples, self.eval_examples):
                    precompute(examples, ("ref_chosen_logps", "ref_rejected_logps"), self.reference_logps,
                               self.collate, ctx)
                self.reference = None  # the initial weights are not needed any more
                self.log(f"dpo: reference log-probs precomputed for {len(self.examples) + len(self.eval_examples)} pairs")

    def reference_logps(self, batch):
        """{"ref_chosen_logps": (B,), "ref_rejected_logps": (B,)} of a preference batch under pi_ref."""
        logps = self.reference.logps(batch["input_ids"], batch["loss_mask"])  # (2B,): chosen rows, then rejected
        B = logps.shape[0] // 2
        return {"ref_chosen_logps": logps[:B], "ref_rejected_logps": logps[B:]}

    def loss(self, model, batch):
        logps, counts, _ = batch_logps(model, batch["input_ids"], batch["loss_mask"],  # one forward, (2B,)
                                       fused=self.cfg.fused_logps)
        B = logps.shape[0] // 2
        chosen, rejected = logps[:B], logps[B:]
        ref = {}
        if self.cfg.loss_type not in REFERENCE_FREE:
            ref = batch if "ref_chosen_logps" in batch else self.reference_logps(batch)
        losses, chosen_rewards, rejected_rewards = preference_loss(
            chosen, rejected, ref.get("ref_chosen_logps"), ref.get("ref_rejected_logps"),
            chosen_counts=counts[:B], rejected_counts=counts[B:], **self.loss_kwargs)
        loss = losses.mean()
        metrics = {"rewards/chosen": chosen_rewards.mean(), "rewards/rejected": rejected_rewards.mean(),
                   "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
                   "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
                   "logps/chosen": chosen.detach().mean(), "logps/rejected": rejected.detach().mean()}
        if self.cfg.rpo_alpha:
            nll = sft_loss(chosen, counts[:B])  # token-mean NLL of the chosen answers
            loss = loss + self.cfg.rpo_alpha * nll
            metrics["nll_loss"] = nll.detach()
        return loss, metrics
