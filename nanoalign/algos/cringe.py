"""CRINGE: the ContRastive Iterative Negative GEneration loss, on binary feedback (single-pass version).

Adolphs, Gao, Xu, Shuster, Sukhbaatar, Weston 2022, "The CRINGE Loss: Learning what language not to model",
arXiv:2211.05826. Positive answers get the usual cross-entropy; for every token y_t of a NEGATIVE answer, a
positive token y+_t is sampled from the model's own top-k prediction at that position (the negative token itself
excluded), and the negative token's logit s- is contrasted with the positive one's s+:

    L_CR(t) = -log( exp(s+_t) / (exp(s+_t) + exp(s-_t)) ) = softplus(s-_t - s+_t),
    L = L_CE(positive answers) + alpha L_CR(negative answers)

so the negative token is pushed below a token the model itself finds plausible there, instead of being pushed
down against the whole vocabulary (which unlikelihood training and gradient ascent do).
Gradients (derived by hand; tests/test_negative_loss.py checks them against autograd), with d = s- - s+:
    dL_CR/ds+ = -sigmoid(d),   dL_CR/ds- = +sigmoid(d),   and 0 for every other logit.
The sampled y+ carries no gradient (it is an index); both logits s+ and s- do.

This implementation differs from the paper in:
  - single pass: the paper's best variant is ITERATIVE (train, generate with the new model, label the generations
    with a classifier, train again); here the negatives are the fixed rows of the data, as the paper's first stage.
  - y+ is sampled with probability softmax(top-k logits) among the k most likely tokens after the negative token is
    removed from them (the paper samples from the top-k, excluding the negative token: we renormalise over the k
    that remain, k - 1 when the negative token was among them). The sampling generator is seeded per micro-batch by
    the run's seed and the batch's content, so a resumed run draws the same y+.
  - both terms are token means over the micro-batch (L_CE over the desirable answers' tokens, L_CR over the
    undesirable answers' tokens), a micro-batch without rows of one kind has that term 0.
Data: the binary format (label true: positive, CE; label false: negative, CRINGE); a preference file is unpaired
first (chosen -> positive, rejected -> negative), as for KTO. Every row is used.
"""
from dataclasses import dataclass
from typing import Annotated

import torch
import torch.nn.functional as F

from nanoalign.algos.kto import load_binary
from nanoalign.config import AT_LEAST_1, NON_NEGATIVE
from nanoalign.logps import token_logps
from nanoalign.trainer import Algorithm


@torch.no_grad()
def sample_positive_tokens(logits, negatives, k=5, generator=None):
    """y+ (N,): one token per row, sampled from softmax over the k largest logits (N, V) without the negative token
    (N,) of that row; with k = 1 the most likely token other than the negative one."""
    masked = logits.float().scatter(1, negatives[:, None], float("-inf"))  # (N, V) the negative token excluded
    top, index = masked.topk(k, dim=1)  # (N, k) the k best remaining tokens
    choice = torch.multinomial(top.softmax(1), 1, generator=generator)  # (N, 1) a position among them
    return index.gather(1, choice)[:, 0]  # (N,) token ids


def cringe_loss(logits, positives, negatives):
    """L_CR per negative token (N,): softplus(s- - s+) with s+ / s- the logits (N, V) of y+ / y- (N,)."""
    dtype = torch.promote_types(logits.dtype, torch.float32)  # at least fp32 (bf16 logits under autocast)
    s_pos = logits.gather(1, positives[:, None])[:, 0].to(dtype)  # (N,) s+
    s_neg = logits.gather(1, negatives[:, None])[:, 0].to(dtype)  # (N,) s-
    return F.softplus(s_neg - s_pos)  # -log(e^s+ / (e^s+ + e^s-))


@dataclass
class CRINGEConfig:
    cringe_alpha: Annotated[float, NON_NEGATIVE] = 1.0  # weight alpha of the contrastive term on negative answers
    cringe_k: Annotated[int, AT_LEAST_1] = 5  # y+ is sampled from the model's top-k tokens at each negative position


class CRINGE(Algorithm):
    name = "cringe"
    Config = CRINGEConfig
    data_format = "binary"
    key_metrics = ("nll_loss", "cringe_loss")

    def __init__(self, cfg, policy, tokenizer, ctx):
        super().__init__(cfg, policy, tokenizer, ctx)
        self.examples = load_binary(cfg.data, tokenizer, self.max_len, self.log)
        self.eval_examples = load_binary(cfg.eval_data, tokenizer, self.max_len, self.log) if cfg.eval_data else []

    def loss(self, model, batch):
        input_ids, loss_mask = batch["input_ids"], batch["loss_mask"]
        logits = model(input_ids, batch["attention_mask"])[:, :-1]  # (B, T-1, V): position t predicts token t+1
        targets, mask = input_ids[:, 1:], loss_mask[:, 1:].bool()  # (B, T-1)
        good = batch["label"][:, None] & mask  # (B, T-1) tokens of positive answers
        bad = ~batch["label"][:, None] & mask  # (B, T-1) tokens of negative answers
        nll = -(token_logps(logits, targets) * good).sum() / good.sum().clamp(min=1)  # L_CE, token mean
        seed = self.cfg.seed * 1_000_003 + int(input_ids.sum())  # the same y+ for the same batch (resume)
        generator = torch.Generator(logits.device).manual_seed(seed)
        positives = sample_positive_tokens(logits[bad], targets[bad], self.cfg.cringe_k, generator)  # (N_bad,)
        cr = cringe_loss(logits[bad], positives, targets[bad])  # (N_bad,)
        cr_mean = cr.mean() if cr.numel() else cr.new_zeros(())
        return nll + self.cfg.cringe_alpha * cr_mean, {"nll_loss": nll.detach(), "cringe_loss": cr_mean.detach()}
