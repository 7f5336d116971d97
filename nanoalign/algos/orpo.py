"""Odds Ratio Preference Optimization (ORPO) as a pure loss function.

Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model",
arXiv:2403.07691. Reference-free: one SFT loss plus an odds-ratio penalty, in one stage. With the
length-normalised likelihood P(y|x) = exp(avg_logp), avg_logp = (1/|y|) sum_t log pi(y_t|x, y_<t),
odds(y|x) = P / (1 - P), and

    L_ORPO = E[ L_SFT + lam * L_OR ]                                    (Eq. 6)
    L_OR   = -log sigmoid( log odds(y_w|x) - log odds(y_l|x) )          (Eq. 7)
    log odds(y|x) = avg_logp - log(1 - exp(avg_logp)).

Numerics: as P -> 1 (avg_logp -> 0^-), 1 - exp(avg_logp) loses every digit in float32 (exp(-1e-8)
rounds to 1, so TRL's log1p(-exp(x)) gives -inf). We compute log(1 - P) = log(-expm1(avg_logp)),
which keeps full relative precision near 0; for very negative avg_logp it rounds to log(1) = 0, an
absolute error below exp(avg_logp) next to a log odds of ~avg_logp, so no second branch is needed.
avg_logp is clamped at MAX_AVG_LOGP < 0 so an exactly certain model (avg_logp == 0.0, which float32
log-softmax does return) gives a finite log odds (about 27.6) instead of +inf.

Gradients (derived by hand; tests/test_kto_orpo_loss.py checks them against autograd), with
x = avg_logp, d log odds / dx = 1 + exp(x) / (1 - exp(x)) = 1 / (1 - exp(x)), and
Delta = log odds(y_w) - log odds(y_l):
  dL/dx_w = -lam s(-Delta) / (1 - exp(x_w)),  dL/dx_l = +lam s(-Delta) / (1 - exp(x_l)),  dL/dnll = 1.

This implementation differs from the paper in:
  - L_SFT is passed in per sequence (`chosen_nll`, (B,)); the adapter decides how it is averaged
    over tokens (the paper's L_SFT is the cross-entropy of y_w given x).
  - TRL 1.16's ORPOTrainer computes its NLL over the whole chosen sequence, prompt AND completion
    (labels wherever the attention mask is 1); ours, like the paper's, is over the completion y_w
    only. docs/dpo.md has the comparison.
  - the clamp at MAX_AVG_LOGP: for avg_logp in (MAX_AVG_LOGP, 0] the odds-ratio term carries no
    gradient for that response (the NLL term still does).

The Algorithm adapter (bottom of this file) runs chosen and rejected rows through ONE forward, takes L_SFT as the
token-mean NLL of the micro-batch's chosen completion tokens (our sft_loss) and passes it to every row, so the
loss is L_SFT + lam * mean(L_OR). No reference model; on the toy world it starts from the base model
(starts_from = "base"), as the paper applies ORPO to pretrained models without an SFT stage. Metrics follow TRL's
ORPOTrainer: rewards/* = lam * average log-probs (which logps/* report too), and, with TRL's names,
log_odds_ratio = mean log sigmoid(Delta) (= -L_OR) and log_odds_chosen = mean Delta.
"""
from dataclasses import dataclass
from typing import Annotated

import torch
import torch.nn.functional as F

from nanoalign.algos.sft import sft_loss
from nanoalign.config import NON_NEGATIVE
from nanoalign.logps import batch_logps
from nanoalign.trainer import Algorithm

MAX_AVG_LOGP = -1e-12  # largest average log-prob used in the log odds; log odds(MAX) = log(1e12) ~ 27.6


def log_odds(avg_logps):
    """log(P / (1 - P)) for P = exp(avg_logps), finite for every avg_logps <= 0."""
    avg_logps = avg_logps.clamp(max=MAX_AVG_LOGP)
    return avg_logps - torch.log(-torch.expm1(avg_logps))  # log P - log(1 - P)


def orpo_loss(chosen_avg_logps, rejected_avg_logps, chosen_nll, *, lam):
    """ORPO losses (B,), the odds-ratio term L_OR (B,) and the log odds ratio Delta (B,).

    chosen_avg_logps, rejected_avg_logps: (B,) per-token average log pi(y|x) of y_w and y_l;
    chosen_nll: (B,) the SFT loss of y_w; lam: weight of L_OR (TRL calls it beta, default 0.1).
    """
    log_odds_ratio = log_odds(chosen_avg_logps) - log_odds(rejected_avg_logps)  # Delta, (B,)
    or_term = -F.logsigmoid(log_odds_ratio)  # L_OR = -log s(Delta), Eq. 7
    losses = chosen_nll + lam * or_term  # L_SFT + lam L_OR, Eq. 6
    return losses, or_term, log_odds_ratio


# --- Algorithm adapter: batch -> average log-probs and NLL of y_w -> orpo_loss ---


@dataclass
class ORPOConfig:
    orpo_lambda: Annotated[float, NON_NEGATIVE] = 0.1  # weight lam of the odds-ratio term (the paper's lambda; TRL's beta)


class ORPO(Algorithm):
    name = "orpo"
    Config = ORPOConfig
    data_format = "preference"
    starts_from = "base"  # ORPO trains a pretrained model directly: no SFT stage
    key_metrics = ("rewards/accuracies", "nll_loss")

    def __init__(self, cfg, policy, tokenizer, ctx):
        super().__init__(cfg, policy, tokenizer, ctx)
        self.examples, self.eval_examples = self.load_data("preference")

    def loss(self, model, batch):
        logps, counts, _ = batch_logps(model, batch["input_ids"], batch["loss_mask"],  # one forward, (2B,)
                                       fused=self.cfg.fused_logps)
        B = logps.shape[0] // 2
        avg = logps / counts.clamp(min=1)  # per-token average log-probs, (2B,)
        nll = sft_loss(logps[:B], counts[:B])  # token-mean NLL of the chosen answers (L_SFT)
        losses, or_term, log_odds_ratio = orpo_loss(avg[:B], avg[B:], nll.expand(B), lam=self.cfg.orpo_lambda)
        chosen_rewards, rejected_rewards = self.cfg.orpo_lambda * avg[:B].detach(), self.cfg.orpo_lambda * avg[B:].detach()
        return losses.mean(), {
            "rewards/chosen": chosen_rewards.mean(), "rewards/rejected": rejected_rewards.mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
            "logps/chosen": avg[:B].detach().mean(), "logps/rejected": avg[B:].detach().mean(),
            "nll_loss": nll.detach(), "log_odds_ratio": -or_term.detach().mean(),  # TRL's names: mean log s(Delta)
            "log_odds_chosen": log_odds_ratio.detach().mean()}  # and mean Delta
