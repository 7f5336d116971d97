"""Kahneman-Tversky Optimization (KTO) as pure loss functions.

Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization", arXiv:2402.01306.
KTO learns from unpaired binary feedback: each (x, y) is desirable (label True) or undesirable
(label False). With the implied reward r(x, y) = log pi(y|x) / pi_ref(y|x) and a reference point
z0 = KL(pi(y'|x) || pi_ref(y'|x)), the loss is (Eq. 8)

    L_KTO = E_{x,y}[ lambda_y - v(x, y) ],
    v(x, y) = lambda_D sigmoid(beta (r(x, y) - z0))   if y is desirable,
              lambda_U sigmoid(beta (z0 - r(x, y)))   if y is undesirable,

so a desirable example costs lambda_D (1 - s(beta (r - z0))) and an undesirable one
lambda_U (1 - s(beta (z0 - r))) (s = sigmoid). The paper estimates z0 from mismatched pairs: each
prompt x_i is paired with another example's completion y'_j, and
z0 = max(0, mean_j log pi(y'_j|x_i) / pi_ref(y'_j|x_i)), with no gradient through z0. The paper
advises lambda_D n_D / (lambda_U n_U) in [1, 4/3] (n_D, n_U: counts of each label).

Gradients (derived by hand; tests/test_kto_orpo_loss.py checks them against autograd), with
r the log-ratio of the example and s' = s(1 - s):
  desirable    dL/dlog pi(y|x) = -lambda_D beta s'(beta (r - z0))   < 0: descent raises r
  undesirable  dL/dlog pi(y|x) = +lambda_U beta s'(beta (z0 - r))   > 0: descent lowers r
  z0           dL/dkl_logps = 0 (detached, as in the paper and TRL)

This implementation differs from the paper in:
  - z0 is estimated on whatever mismatched pairs the caller passes (the adapter uses its own
    micro-batch), not averaged over all ranks as TRL 1.16 does; with small micro-batches the
    estimate is noisier. Like the paper and TRL it is clamped at 0 and detached.
  - the data must hold both labels: `check_labels` raises a clear error instead of training on
    one-sided feedback (and instead of the NaN that a mean over an empty side gives).

The Algorithm adapter (bottom of this file) trains on binary JSONL {"prompt","completion","label"} or on
preference JSONL, which it unpairs (chosen -> desirable, rejected -> undesirable; detected from the columns).
Each example gets one mismatched pair, fixed for the run as TRL fixes its "KL dataset": its own prompt with the
completion of the next example in a seeded random cycle over the dataset (TRL 1.16 rotates completions by one
within each mapped batch, i.e. takes a file-order neighbour's, which in data with several completions per prompt,
like the toy world's, often has the same prompt and so is no mismatch). Comparison with TRL: docs/dpo.md. z0 is the mean over the micro-batch's pairs; the policy's log-probs on them need no gradient.
Reference log-probs are precomputed once or kept live, exactly as in algos/dpo.py (`Reference`, `precompute`).
A micro-batch may hold one label only: its loss is still defined, and the missing side's metrics are logged as 0.
"""
import json
from dataclasses import dataclass
from typing import Annotated, Literal

import torch

from nanoalign.config import POSITIVE
from nanoalign.data import collate, read_jsonl, report, tokenize_binary, unpair
from nanoalign.logps import batch_logps
from nanoalign.reference import Reference, precompute
from nanoalign.trainer import Algorithm


def kto_loss(chosen_logps, rejected_logps, kl_logps, ref_chosen_logps, ref_rejected_logps, ref_kl_logps, *,
             beta=0.1, desirable_weight=1.0, undesirable_weight=1.0):
    """KTO losses (N_D + N_U,), detached rewards (N_D,), (N_U,) and the detached scalar z0.

    chosen_logps: (N_D,) summed log pi(y|x) of desirable examples; rejected_logps: (N_U,) of
    undesirable ones; kl_logps: (M,) summed log pi(y'|x) of mismatched (prompt, completion) pairs;
    ref_*: the same three under pi_ref. Either of N_D, N_U may be 0.
    """
    kl = (kl_logps - ref_kl_logps).mean().clamp(min=0).detach()  # z0 = max(0, mean log pi/pi_ref (y'|x))
    chosen_logratios = chosen_logps - ref_chosen_logps  # r(x, y) for desirable y, (N_D,)
    rejected_logratios = rejected_logps - ref_rejected_logps  # r(x, y) for undesirable y, (N_U,)
    chosen_losses = 1 - torch.sigmoid(beta * (chosen_logratios - kl))  # 1 - s(beta (r - z0))
    rejected_losses = 1 - torch.sigmoid(beta * (kl - rejected_logratios))  # 1 - s(beta (z0 - r))
    losses = torch.cat([desirable_weight * chosen_losses, undesirable_weight * rejected_losses])
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach(), kl


def check_labels(labels, where="dataset"):
    """Return (n_desirable, n_undesirable) of boolean `labels`; raise ValueError if a label is missing.

    `where` names what the labels come from ("dataset", "micro-batch 3", ...) for the message.
    """
    labels = torch.as_tensor(labels).bool()
    n_desirable = int(labels.sum())
    n_undesirable = labels.numel() - n_desirable
    if n_desirable == 0 or n_undesirable == 0:
        raise ValueError(
            f"KTO needs both desirable (label true) and undesirable (label false) examples, but the "
            f"{where} has {n_desirable} desirable and {n_undesirable} undesirable; with one label the "
            f"loss has nothing to contrast against (and its per-label metrics would be NaN)")
    return n_desirable, n_undesirable


# --- Algorithm adapter: batch -> log-probs (incl. mismatched KL pairs) -> kto_loss ---


def is_preference_file(path):
    """True if the first row has chosen/rejected and no completion column (then it is unpaired for KTO)."""
    try:
        with open(path, encoding="utf-8") as f:
            first = json.loads(next(line for line in f if line.strip()))
    except (OSError, StopIteration, ValueError):
        return False  # read_jsonl reports what is wrong, with path:line
    return isinstance(first, dict) and {"chosen", "rejected"} <= first.keys() and "completion" not in first


def load_binary(path, tokenizer, max_len, log=print):
    """Binary examples {"input_ids","loss_mask","label"}; preference files are unpaired first."""
    if is_preference_file(path):
        rows = unpair(read_jsonl(path, "preference"))
        log(f"kto: {path} holds preference pairs; unpaired into {len(rows)} rows (chosen -> desirable, "
            f"rejected -> undesirable)")
    else:
        rows = read_jsonl(path, "binary")
    examples, filtered = tokenize_binary(rows, tokenizer, max_len)
    report(filtered, path, len(examples), log)
    return examples


def add_mismatched_pairs(examples, seed, max_len, n_bos):
    """Give each example kl_ids/kl_mask: its own prompt + the completion of the next example in a seeded random
    cycle. The prompt is cut from the left (after the BOS) if the pair would exceed max_len."""
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    for a, b in zip(order, order[1:] + order[:1]):
        prompt = examples[a]["input_ids"][:examples[a]["loss_mask"].index(1)]  # BOS + prompt tokens
        start = examples[b]["loss_mask"].index(1)
        completion = examples[b]["input_ids"][start:]  # completion + EOS
        body, keep = prompt[n_bos:], max_len - len(completion) - n_bos  # keep >= 0: completion fit with its own BOS
        prompt = prompt[:n_bos] + body[max(len(body) - keep, 0):]
        examples[a]["kl_ids"] = prompt + completion
        examples[a]["kl_mask"] = [0] * len(prompt) + [1] * len(completion)


def side_mean(values):
    """Mean of a (possibly empty) tensor; 0 for an empty side, so every micro-batch logs the same keys."""
    return values.mean() if values.numel() else values.new_zeros(())


@dataclass
class KTOConfig:
    beta: Annotated[float, POSITIVE] = 0.1  # sharpness of the value function (the KL strength)
    desirable_weight: Annotated[float, POSITIVE] = 1.0  # lambda_D
    undesirable_weight: Annotated[float, POSITIVE] = 1.0  # lambda_U
    ref_logps: Literal["precompute", "live"] = "precompute"  # reference log-probs once before training, or a live model


class KTO(Algorithm):
    name = "kto"
    Config = KTOConfig
    data_format = "binary"
    key_metrics = ("rewards/chosen", "rewards/rejected", "kl")

    def __init__(self, cfg, policy, tokenizer, ctx):
        super().__init__(cfg, policy, tokenizer, ctx)
        log, max_len = self.log, self.max_len
        n_bos = int(tokenizer.bos_id is not None)
        self.examples = load_binary(cfg.data, tokenizer, max_len, log)
        n_desirable, n_undesirable = check_labels([e["label"] for e in self.examples], where=f"dataset {cfg.data}")
        ratio = cfg.desirable_weight * n_desirable / (cfg.undesirable_weight * n_undesirable)
        log(f"kto: {n_desirable} desirable, {n_undesirable} undesirable; lambda_D n_D / (lambda_U n_U) = {ratio:.2f}"
            + ("" if 1 <= ratio <= 4 / 3 else " (the paper advises 1 to 4/3: adjust desirable/undesirable_weight)"))
        self.eval_examples = load_binary(cfg.eval_data, tokenizer, max_len, log) if cfg.eval_data else []
        for examples in (self.examples, self.eval_examples):
            if examples:
                add_mismatched_pairs(examples, cfg.seed, max_len, n_bos)
        self.reference = Reference(policy, copy=cfg.ref_logps == "live", fused=cfg.fused_logps,
                                   dtype=ctx.inference_dtype)
        if cfg.ref_logps == "precompute":
            for examples in (self.examples, self.eval_examples):
                precompute(examples, ("ref_logps", "ref_kl_logps"), self.reference_logps, self.collate, ctx)
            self.reference = None  # the initial weights are not needed any more

    def collate(self, examples):
        pad = self.tokenizer.pad_id
        batch = collate([{k: v for k, v in e.items() if k not in ("kl_ids", "kl_mask")} for e in examples], pad)
        kl = collate([{"input_ids": e["kl_ids"], "loss_mask": e["kl_mask"]} for e in examples], pad)
        batch["kl_input_ids"], batch["kl_loss_mask"] = kl["input_ids"], kl["loss_mask"]
        return batch

    def reference_logps(self, batch):
        """{"ref_logps": (B,), "ref_kl_logps": (B,)}: pi_ref on the examples and on their mismatched pairs."""
        return {"ref_logps": self.reference.logps(batch["input_ids"], batch["loss_mask"]),
                "ref_kl_logps": self.reference.logps(batch["kl_input_ids"], batch["kl_loss_mask"])}

    def loss(self, model, batch):
        fused = self.cfg.fused_logps
        logps, _, _ = batch_logps(model, batch["input_ids"], batch["loss_mask"], fused=fused)  # (B,)
        with torch.no_grad():  # z0 is detached: no graph for the mismatched pairs
            kl_logps, _, _ = batch_logps(model, batch["kl_input_ids"], batch["kl_loss_mask"], fused=fused)  # (B,)
        ref = batch if "ref_logps" in batch else self.reference_logps(batch)
        good = batch["label"]  # (B,) bool, True = desirable
        losses, chosen_rewards, rejected_rewards, kl = kto_loss(
            logps[good], logps[~good], kl_logps, ref["ref_logps"][good], ref["ref_logps"][~good], ref["ref_kl_logps"],
            beta=self.cfg.beta, desirable_weight=self.cfg.desirable_weight,
            undesirable_weight=self.cfg.undesirable_weight)
        return losses.mean(), {
            "rewards/chosen": side_mean(chosen_rewards), "rewards/rejected": side_mean(rejected_rewards), "kl": kl,
            "logps/chosen": side_mean(logps[good].detach()), "logps/rejected": side_mean(logps[~good].detach())}
