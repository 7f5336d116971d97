"""Reward model: a language model with a scalar head, trained on preference pairs with the Bradley-Terry loss.

InstructGPT (Ouyang et al. 2022, Sec. 3.5, Eq. 1) after Stiennon et al. 2020 (Sec. 3.4):
    loss(theta) = -E_(x, y_c, y_r) [ log sigmoid(r_theta(x, y_c) - r_theta(x, y_r)) ]
r_theta(x, y) is a linear head on the final hidden state of the LAST token of x + y, which in our sequences is the
EOS after the completion (data.py appends it), so the model has read the whole response before scoring it.
Options (both from TRL's RewardTrainer): a per-pair `margin` column, loss -log sigmoid(r_c - r_r - m) (Llama 2,
Touvron et al. 2023, Eq. 2); and a centring term c * mean((r_c + r_r)^2) (Eisenstein et al. 2023) that keeps the
rewards near 0, since the BT loss only sees differences.
Details from lm-human-preferences (Ziegler et al. 2019) kept here: the model starts from the SFT policy; the head is
initialised N(0, 1/sqrt(d + 1)); after training the rewards are normalised to mean 0 and std 1 on reference
samples (the training completions by default, or --rm_norm_data, e.g. samples of the SFT policy), and the two
statistics are stored in the model (buffers reward_mean / reward_std) so every user of the checkpoint gets
normalised scores: PPO's KL coefficient is then in units of reward standard deviations.
Option (ours, not in the papers): --rm_readout=sum scores a sequence by the SUM of the head over all its real tokens
(prompt, completion, EOS) instead of the head at the EOS. It fits rewards that add up over the text, like the toy
world's gold reward, sigmoid of a sum of per-word sentiment weights (each in the context of its "not"/"very"): the
EOS readout must gather a sum whose number of terms varies through attention, which averages. token_values(t) is
then the running sum up to t (the score if the text ended at t), which is what a critic started from it reads.
Departures: InstructGPT trains on all K-choose-2 comparisons of a prompt in one batch element; we treat each pair as
an independent example (TRL's choice). Lm-human-preferences normalises with samples of the policy at the start of
training and again after; we normalise once, at the end. Evaluation (--eval_data) reports the training loss, centring
term included, averaged over the eval micro-batches. The toy world's reward model and its accuracy: docs/ppo.md.
"""
from dataclasses import dataclass
from typing import Annotated

import torch
import torch.nn.functional as F

from nanoalign.config import AT_LEAST_1, NON_NEGATIVE
from nanoalign.data import Filtered, collate, read_jsonl, report, tokenize_preference, tokenize_sft
from nanoalign.model import RewardModel
from nanoalign.trainer import Algorithm


def reward_loss(chosen, rejected, margin=None, center_coef=0.0):
    """Bradley-Terry loss on rewards (B,) of the chosen and rejected completions of B pairs:
        L = mean_i -log sigmoid(r_c,i - r_r,i - m_i)  +  c * mean_i (r_c,i + r_r,i)^2
    margin (B,) or None (m = 0). Returns the scalar loss."""
    diff = chosen - rejected                                             # r_c - r_r  (B,)
    if margin is not None:
        diff = diff - margin                                             # require r_c - r_r > m
    loss = -F.logsigmoid(diff).mean()                                    # -log sigma(.) is softplus(-.): stable
    if center_coef:
        loss = loss + center_coef * ((chosen + rejected) ** 2).mean()    # pulls the pair's mean reward to 0
    return loss


def load_pairs(path, tokenizer, max_len, log):
    """Preference examples keeping an optional per-pair "margin" column (tokenised row by row so it stays aligned)."""
    examples, filtered = [], Filtered()
    for row in read_jsonl(path, "preference"):
        kept, f = tokenize_preference([row], tokenizer, max_len)
        filtered.dropped.update(f.dropped)
        filtered.truncated += f.truncated
        examples += [{**e, "margin": float(row["margin"])} if "margin" in row else e for e in kept]
    if any("margin" in e for e in examples) and not all("margin" in e for e in examples):
        raise ValueError(f"{path}: some rows have a 'margin' column and some do not")
    report(filtered, path, len(examples), log)
    return examples


@dataclass
class RMConfig:
    rm_center_coef: Annotated[float, NON_NEGATIVE] = 0.0  # c of the centring term c * mean((r_c + r_r)^2); 0 -> off (TRL suggests 0.01)
    rm_norm_data: str = ""  # JSONL {"prompt","completion"} of reference samples for the final normalisation;
    #                        "" -> the chosen and rejected completions of the training data
    rm_norm_samples: Annotated[int, AT_LEAST_1] = 2048  # at most this many reference samples
    rm_readout: str = "eos"  # "eos": the head on the last token; "sum": the sum of the head over every real token


class RewardTrainer(Algorithm):
    name = "rm"
    Config = RMConfig
    data_format = "preference"
    key_metrics = ("accuracy",)
    checkpoint_kind = "reward"

    def __init__(self, cfg, policy, tokenizer, ctx):
        super().__init__(cfg, policy, tokenizer, ctx)
        self.module = RewardModel(policy, cfg.rm_readout)
        self.examples = load_pairs(cfg.data, tokenizer, self.max_len, self.log)
        self.eval_examples = load_pairs(cfg.eval_data, tokenizer, self.max_len, self.log) if cfg.eval_data else []

    def pair_rewards(self, model, batch):
        rewards = model(batch["input_ids"], batch["attention_mask"])     # (2B,) one forward for both
        return rewards.chunk(2)                                          # chosen (B,), rejected (B,)

    def loss(self, model, batch):
        chosen, rejected = self.pair_rewards(model, batch)
        loss = reward_loss(chosen, rejected, batch.get("margin"), self.cfg.rm_center_coef)
        both = torch.cat([chosen, rejected]).detach()
        return loss, {"accuracy": (chosen > rejected).float().mean(), "margin": (chosen - rejected).mean().detach(),
                      "rewards/chosen": chosen.mean().detach(), "rewards/rejected": rejected.mean().detach(),
                      "rewards/mean": both.mean(), "rewards/std": both.std()}

    def reference_sequences(self):
        """Token lists of the reference samples for the normalisation (prompt + completion + EOS)."""
        cfg = self.cfg
        if cfg.rm_norm_data:
            rows = read_jsonl(cfg.rm_norm_data, "sft")
            return [e["input_ids"] for e in tokenize_sft(rows, self.tokenizer, self.max_len)[0]][:cfg.rm_norm_samples]
        seqs = [e[k] for e in self.examples for k in ("chosen_ids", "rejected_ids")]
        return seqs[:cfg.rm_norm_samples]

    @torch.no_grad()
    def finish(self, model):
        """Normalise the final rewards to mean 0, std 1 on the reference samples (every rank computes the same)."""
        module = self.module
        module.normalise(0.0, 1.0)
        seqs, n = self.reference_sequences(), self.ctx.micro_batch_size * 2
        raw = []
        for i in range(0, len(seqs), n):
            batch = collate([{"input_ids": s, "loss_mask": [1] * len(s)} for s in seqs[i:i + n]], self.tokenizer.pad_id)
            with self.ctx.autocast():
                raw.append(module(batch["input_ids"].to(self.ctx.device), batch["attention_mask"].to(self.ctx.device)))
        raw = torch.cat(raw).float()
        module.normalise(raw.mean().item(), raw.std().clamp(min=1e-6).item())
        self.log(f"rm: rewards normalised on {len(raw)} reference samples (raw mean {raw.mean():.4f}, "
                 f"std {raw.std():.4f})")
