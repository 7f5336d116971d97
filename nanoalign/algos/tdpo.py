"""Token-level Direct Preference Optimization (TDPO1 and TDPO2).

Zeng, Liu, Ma, Yang, Zhang, Wang 2024, "Token-level Direct Preference Optimization", arXiv:2404.11999. TDPO keeps
DPO's margin of log-ratios and subtracts the difference of the SEQUENTIAL KL divergences of the two answers, a
forward KL from the reference to the policy over the full vocabulary at every answer token:

    D_SeqKL(x, y; pi_ref || pi) = sum_t KL( pi_ref(. | x, y_<t) || pi(. | x, y_<t) ),
    u     = beta log pi(y_w|x)/pi_ref(y_w|x) - beta log pi(y_l|x)/pi_ref(y_l|x)          (DPO's beta h)
    delta = beta D_SeqKL(x, y_l; pi_ref || pi) - beta D_SeqKL(x, y_w; pi_ref || pi)

    TDPO1:  L = -log sigmoid(u - delta)
    TDPO2:  L = -log sigmoid(u - alpha delta_2),
            delta_2 = beta D_SeqKL(x, y_l; pi_ref || pi) - sg(beta D_SeqKL(x, y_w; pi_ref || pi))

with sg the stop-gradient: TDPO2 pulls the dispreferred answer's token distributions back to the reference (the KL
of y_l gets a gradient) but not the preferred one's, which DPO's margin is free to move, and alpha weighs the term.
alpha = 0 is DPO's sigmoid loss exactly (tests/test_negative_loss.py). Equation numbers are not given here: the
paper's text was not at hand, so the two losses were checked against the authors' released code instead
(github.com/Vance0124/Token-level-Direct-Preference-Optimization, trainers.py: tdpo_loss and the per-position KL
sum(p_ref (log p_ref - log p)) over the vocabulary), whose defaults, TDPO2 with alpha 0.5 and beta 0.1, are ours.

Gradients (derived by hand; tests/test_negative_loss.py checks them against autograd). With z = u - alpha delta_2
(TDPO1: alpha = 1 and no sg), d(-log sigmoid(z))/dz = -sigmoid(-z), K_w, K_l the two sequential KLs and h the
margin of summed log-ratios c - r:
    dL/dc = -beta s(-z),   dL/dr = +beta s(-z),   dL/dK_l = +alpha beta s(-z),
    dL/dK_w = -alpha beta s(-z) (TDPO1),  0 (TDPO2: stop-gradient),
and for the KL at one position, d KL(p_ref || softmax(z)) / dz = softmax(z) - p_ref (the logits' gradient).

This implementation differs from the paper in:
  - the full-vocabulary reference distributions are computed live from a frozen reference (reference.Reference's
    model()), one forward of pi_ref per micro-batch, not precomputed: storing (answer tokens x vocabulary) floats per
    pair would cost more than the forward. So pi_ref is a second model in memory (LoRA: the adapters off).
  - the policy's log-probs come from its full logits (B, T, V) at every position, not the fused completion-only head
    of logps.batch_logps, since the KL needs the whole distribution; only completion positions enter the sums.
  - alpha is TDPO2's only (as in the paper; TDPO1 has none); rewards are logged as beta * log-ratio, as for DPO
    (the authors' code logs beta * (log-ratio + sequential KL)).
"""
from dataclasses import dataclass
from typing import Annotated, Literal

import torch
import torch.nn.functional as F

from nanoalign.config import NON_NEGATIVE, POSITIVE
from nanoalign.reference import Reference
from nanoalign.trainer import Algorithm

VARIANTS = ("tdpo1", "tdpo2")


def token_level_terms(logits, ref_logits, input_ids, loss_mask):
    """Summed log-ratios (B,) and sequential KLs D_SeqKL(pi_ref || pi) (B,) of the completion tokens.

    logits, ref_logits: (B, T, V) of the policy and the reference over input_ids (B, T); loss_mask (B, T) is 1 on
    completion tokens. Position t's logits predict token t+1, so the sums run over t with loss_mask[:, t+1] = 1.
    """
    dtype = torch.promote_types(logits.dtype, torch.float32)  # at least fp32 (bf16 logits under autocast)
    logp = F.log_softmax(logits[:, :-1].to(dtype), dim=-1)  # (B, T-1, V) log pi(. | x, y_<t)
    ref_logp = F.log_softmax(ref_logits[:, :-1].to(dtype), dim=-1)  # (B, T-1, V) log pi_ref(. | x, y_<t)
    mask = loss_mask[:, 1:].to(dtype)  # (B, T-1)
    targets = input_ids[:, 1:, None]  # (B, T-1, 1) the next token
    token_ratios = (logp.gather(-1, targets) - ref_logp.gather(-1, targets))[..., 0]  # (B, T-1) log pi/pi_ref (y_t)
    token_kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)  # (B, T-1) KL(pi_ref || pi) at each position
    return (token_ratios * mask).sum(-1), (token_kl * mask).sum(-1)


def tdpo_loss(chosen_logratios, rejected_logratios, chosen_seq_kl, rejected_seq_kl, *, beta=0.1, alpha=0.5,
              variant="tdpo2"):
    """Per-pair losses (B,) and detached rewards beta * log-ratio (B,), (B,) of TDPO1 / TDPO2 (module doc).

    *_logratios: (B,) summed log pi(y|x) - log pi_ref(y|x); *_seq_kl: (B,) D_SeqKL(x, y; pi_ref || pi).
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown tdpo_variant {variant!r}; choose one of {VARIANTS}")
    margin = chosen_logratios - rejected_logratios  # h, (B,)
    if variant == "tdpo1":  # u - delta = beta (h - (K_l - K_w))
        z = beta * (margin - (rejected_seq_kl - chosen_seq_kl))
    else:  # u - alpha delta_2 = beta (h - alpha (K_l - sg(K_w)))
        z = beta * (margin - alpha * (rejected_seq_kl - chosen_seq_kl.detach()))
    return -F.logsigmoid(z), beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


@dataclass
class TDPOConfig:
    beta: Annotated[float, POSITIVE] = 0.1  # inverse KL strength of the margin and the sequential-KL term
    tdpo_alpha: Annotated[float, NON_NEGATIVE] = 0.5  # TDPO2's weight of the sequential-KL term; 0 -> DPO
    tdpo_variant: Literal[VARIANTS] = "tdpo2"  # tdpo1, or tdpo2 (alpha, stop-gradient on the KL of y_w)


class TDPO(Algorithm):
    name = "tdpo"
    Config = TDPOConfig
    data_format = "preference"
    key_metrics = ("rewards/accuracies", "seqkl/rejected")

    def __init__(self, cfg, policy, tokenizer, ctx):
        super().__init__(cfg, policy, tokenizer, ctx)
        self.examples, self.eval_examples = self.load_data("preference")
        self.reference = Reference(policy, copy=True, fused=cfg.fused_logps, dtype=ctx.inference_dtype)

    def loss(self, model, batch):
        input_ids, attention_mask, loss_mask = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
        logits = model(input_ids, attention_mask)  # (2B, T, V): chosen rows, then rejected
        with torch.no_grad(), self.reference.model() as reference:
            ref_logits = reference(input_ids, attention_mask)  # (2B, T, V) pi_ref's full distributions
        logratios, seq_kl = token_level_terms(logits, ref_logits, input_ids, loss_mask)  # (2B,), (2B,)
        B = logratios.shape[0] // 2
        losses, chosen_rewards, rejected_rewards = tdpo_loss(
            logratios[:B], logratios[B:], seq_kl[:B], seq_kl[B:], beta=self.cfg.beta, alpha=self.cfg.tdpo_alpha,
            variant=self.cfg.tdpo_variant)
        return losses.mean(), {
            "rewards/chosen": chosen_rewards.mean(), "rewards/rejected": rejected_rewards.mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
            "seqkl/chosen": seq_kl[:B].detach().mean(), "seqkl/rejected": seq_kl[B:].detach().mean()}
