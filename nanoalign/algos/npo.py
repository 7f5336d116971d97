"""Negative Preference Optimization (NPO) and its beta -> 0 limit, gradient ascent (GA), on dispreferred answers.

Zhang, Lin, Bai, Mei 2024, "Negative Preference Optimization: From Catastrophic Collapse to Effective Unlearning",
arXiv:2404.05868. NPO is DPO (Eq. 2) with the preferred answer dropped: only a "forget set" of dispreferred
answers y is given, and with r = log pi(y|x) - log pi_ref(y|x) (summed over the answer's tokens) the loss is (Eq. 3)

    L_NPO = -(2/beta) E[ log sigmoid(-beta r) ] = (2/beta) E[ log(1 + (pi(y|x) / pi_ref(y|x))^beta) ].

Gradient ascent on the forget set's likelihood is L_GA = E[log pi(y|x)] (Eq. 1), and Proposition 1:
L_NPO - (2/beta) log 2 -> L_GA - E[log pi_ref(y|x)] = E[r] as beta -> 0, with the same limit of the gradients.
Gradients (Eqs. 4-5; derived by hand, tests/test_negative_loss.py checks them against autograd):
    npo  dL/dlog pi(y|x) = 2 sigmoid(beta r) = 2 pi^beta / (pi^beta + pi_ref^beta)   in (0, 2), -> 0 as r -> -inf
    ga   dL/dlog pi(y|x) = 1                                                          constant: no brake
so NPO's push on an answer fades once the answer is unlearned (pi << pi_ref), where GA's never does; this is why GA
diverges linearly and collapses, NPO only logarithmically (Theorem 2).

NPO+RT (Sections 4-5, the paper's best variant): L = L_NPO + retain_weight * L_RT with L_RT = -E_retain[log pi(y|x)]
on a retain set, which keeps the model's language while the forget set is pushed down (the paper varies the weight
from 0 to 5 on TOFU; with more weight, up to 2, forget quality also grew).

Data: the binary format {"prompt","completion","label"} (KTO's; a preference file is unpaired first, chosen ->
desirable, rejected -> undesirable, as kto.load_binary does). Undesirable rows (label false) are the forget set;
desirable rows (label true) are the retain set of NPO+RT. With retain_weight = 0 the desirable rows are unused: they
are dropped at load time and their count is logged. On the toy world's binary.jsonl that is 2,960 of 5,997 rows.

The retain term is the paper's: the mean over the micro-batch's desirable answers of their SUMMED NLL, on the scale
of the NPO term (a sum over the answer's tokens too). A token mean (as DPO's rpo_alpha) would weigh it |y| times
less: on the toy world (|y| ~ 15) NPO+RT with a token-mean retain term at weight 1 collapsed and needed weight 10
(docs/negative.md). `nll_loss` is logged as the token mean, comparable with SFT's.

This implementation differs from the paper in:
  - the NPO term is the mean over the micro-batch's undesirable rows and the retain term over its desirable rows; a
    micro-batch without rows of one kind has that term 0 (each micro-batch draws forget and retain rows together
    from one shuffled dataset, where the paper draws a forget batch and a retain batch separately).
  - retain_weight defaults to 1 (NPO+RT), since on the toy world the forget set is samples of the reference policy
    itself and plain NPO has no anchor but its fading weight; --retain_weight=0 is the paper's plain NPO.
  - "ga" is written as E[r] = E[log pi - log pi_ref] (Proposition 1's limit), the paper's L_GA shifted by a
    constant, so GA and NPO report losses on one scale; the gradient is L_GA's.
Reference log-probs are precomputed once or kept live, exactly as in algos/dpo.py (`Reference`, `precompute`).
"""
from dataclasses import dataclass
from typing import Annotated, Literal

import torch.nn.functional as F

from nanoalign.algos.kto import load_binary, side_mean
from nanoalign.algos.sft import sft_loss
from nanoalign.config import NON_NEGATIVE, POSITIVE
from nanoalign.logps import batch_logps
from nanoalign.reference import Reference, precompute
from nanoalign.trainer import Algorithm

LOSS_TYPES = ("npo", "ga")


def npo_loss(logps, ref_logps, *, beta=0.1, loss_type="npo"):
    """Per-answer losses (N,) and detached rewards beta * r (N,) of the dispreferred answers.

    logps, ref_logps: (N,) summed log pi(y|x) and log pi_ref(y|x) of N dispreferred answers (N may be 0).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; choose one of {LOSS_TYPES}")
    logratios = logps - ref_logps  # r = log pi(y|x) / pi_ref(y|x), (N,)
    if loss_type == "npo":  # -(2/beta) log sigmoid(-beta r) = (2/beta) log(1 + (pi/pi_ref)^beta), Eq. 3
        losses = -(2 / beta) * F.logsigmoid(-beta * logratios)
    else:  # "ga": the beta -> 0 limit of L_NPO - (2/beta) log 2 (Proposition 1): r itself
        losses = logratios
    return losses, beta * logratios.detach()


@dataclass
class NPOConfig:
    beta: Annotated[float, POSITIVE] = 0.1  # inverse temperature; beta -> 0 is gradient ascent
    loss_type: Literal[LOSS_TYPES] = "npo"  # npo (Eq. 3) or ga (gradient ascent, its beta -> 0 limit)
    retain_weight: Annotated[float, NON_NEGATIVE] = 1.0  # weight of the desirable answers' summed NLL (NPO+RT); 0: NPO
    ref_logps: Literal["precompute", "live"] = "precompute"  # reference log-probs once before training, or a live model


class NPO(Algorithm):
    name = "npo"
    Config = NPOConfig
    data_format = "binary"
    key_metrics = ("logps/rejected", "nll_loss")

    def __init__(self, cfg, policy, tokenizer, ctx):
        super().__init__(cfg, policy, tokenizer, ctx)
        self.examples = self.load_rows(cfg.data)
        self.eval_examples = self.load_rows(cfg.eval_data) if cfg.eval_data else []
        self.reference = Reference(policy, copy=cfg.ref_logps == "live", fused=cfg.fused_logps,
                                   dtype=ctx.inference_dtype)
        if cfg.ref_logps == "precompute":
            for examples in (self.examples, self.eval_examples):
                precompute(examples, ("ref_logps",), self.reference_logps, self.collate, ctx)
            self.reference = None  # the initial weights are not needed any more

    def load_rows(self, path):
        """Binary examples: undesirable = forget set; desirable = retain set, or dropped (counted) without one."""
        examples = load_binary(path, self.tokenizer, self.max_len, self.log)
        n_forget = sum(not e["label"] for e in examples)
        if n_forget == 0:
            raise ValueError(f"{path}: npo needs undesirable answers (label false), the forget set, but all "
                             f"{len(examples)} rows are desirable")
        if self.cfg.retain_weight == 0:
            self.log(f"npo: {path}: {n_forget} undesirable rows (the forget set); {len(examples) - n_forget} "
                     "desirable rows not used (retain_weight=0)")
            return [e for e in examples if not e["label"]]
        self.log(f"npo: {path}: {n_forget} undesirable rows (the forget set), {len(examples) - n_forget} desirable "
                 f"rows (the retain set, weight {self.cfg.retain_weight})")
        return examples

    def reference_logps(self, batch):
        """{"ref_logps": (B,)}: summed log pi_ref of every row of the batch."""
        return {"ref_logps": self.reference.logps(batch["input_ids"], batch["loss_mask"])}

    def loss(self, model, batch):
        logps, counts, _ = batch_logps(model, batch["input_ids"], batch["loss_mask"],  # (B,)
                                       fused=self.cfg.fused_logps)
        ref = batch if "ref_logps" in batch else self.reference_logps(batch)
        forget = ~batch["label"]  # (B,) bool: the undesirable answers
        losses, rewards = npo_loss(logps[forget], ref["ref_logps"][forget], beta=self.cfg.beta,
                                   loss_type=self.cfg.loss_type)
        loss = side_mean(losses)  # mean over the forget rows; 0 when the micro-batch has none
        metrics = {"rewards/rejected": side_mean(rewards), "logps/rejected": side_mean(logps[forget].detach())}
        if self.cfg.retain_weight:
            retain = -side_mean(logps[~forget])  # L_RT = -E_retain[log pi(y|x)], summed over tokens (0 if none)
            loss = loss + self.cfg.retain_weight * retain
            metrics.update({"nll_loss": sft_loss(logps[~forget], counts[~forget]).detach(),  # token mean, logged
                            "logps/chosen": side_mean(logps[~forget].detach())})
        return loss, metrics
