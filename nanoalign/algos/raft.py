"""RAFT / best-of-n: sample n, keep the best by the reward, and either fine-tune on it (RAFT) or just answer with it
(best-of-n sampling, an inference-time baseline with no training).

RAFT (Dong et al. 2023, "RAFT: Reward rAnked FineTuning for Generative Foundation Model Alignment",
arXiv:2304.06767, Algorithm 1): each stage samples n responses to every prompt of a batch from the CURRENT model,
ranks them by the reward and keeps the best one per prompt, then fine-tunes on the kept (prompt, response) pairs with
the SFT loss (algos/sft.py sft_loss: the token-mean negative log-likelihood of the response). Repeating the stages
is an iterated, on-policy rejection-sampling fine-tuning (the "expert iteration" / ReST family).

Best-of-n (Stiennon et al. 2020; Gao et al. 2022): `best_of_n_sampler` draws n samples from a model and returns the
best; with the reference as the model this is the baseline every trained policy should beat at equal KL. Its policy
is not a network, but its KL to the model sampled from is known in closed form when rewards do not tie:
KL = log n - (n - 1) / n (rl_math.best_of_n_kl; an upper bound when rewards tie).

This implementation differs from the RAFT paper in:
  - one stage is one rollout of batch_size prompts, trained on for `epochs` optimizer steps (the paper collects a
    larger set per stage and fine-tunes on it, possibly for several epochs);
  - the best is taken per prompt (the paper's ranking; its top-1/k global-ranking variant is not implemented) and is
    kept even when every sample of the prompt is poor (no reward threshold);
  - no KL term (as in the paper): the only brakes are the number and size of the steps (lr, max_steps) and n (a
    larger n keeps higher-reward samples, further from pi_ref). KL knob in the frontier: max_steps. On the toy world
    the gold reward grows with every extra positive word, so a long RAFT run drifts to long, ungrammatical praise
    cut at max_new_tokens (reward hacking; missing_eos_penalty > 0 removes the cut-off ones from the winners).
Default reward on the toy world: the gold reward (reward_model="gold").
"""
import math
from dataclasses import dataclass
from typing import Annotated

import torch

from nanoalign.algos.online import OnlineAlgorithm, OnlineConfig, sequence_logps
from nanoalign.algos.sft import sft_loss
from nanoalign.config import Range


def best_of_n_kl(n):
    """KL(best-of-n || base) = log n - (n - 1) / n, the analytic formula quoted by Stiennon et al. 2020
    and Gao et al. 2022 (arXiv:2210.10760), derived by J. Hilton. Exact when the reward has no ties
    (continuous outcomes); for discrete outcomes it is an upper bound (Beirami et al. 2024,
    arXiv:2401.01879)."""
    return math.log(n) - (n - 1) / n


def best_in_groups(scores, n):
    """Index (into the N = G*n rows) of the highest score in each consecutive group of n: (N,) -> (G,).
    Ties go to the first sample of the group."""
    grouped = scores.view(-1, n)                                       # (G, n)
    return grouped.argmax(dim=1) + n * torch.arange(grouped.shape[0], device=scores.device)


def best_of_n_sampler(sampler, scorer, tokenizer, n):
    """An inference-time best-of-n policy in the toy evaluation's Sampler form (nanoalign/toy/evaluate.py):
    (prompt token lists, generator) -> completion token lists. Each prompt gets n completions from `sampler`
    (e.g. model_sampler(reference, ...)), scored by scorer(prompt texts, completion texts) -> (N,); the best is kept."""
    def sample(prompt_ids, generator):
        repeated = [p for p in prompt_ids for _ in range(n)]            # the n copies of a prompt are adjacent
        completions = sampler(repeated, generator)
        texts = [tokenizer.decode([t for t in c if t != tokenizer.eos_id]) for c in completions]
        scores = torch.as_tensor(scorer([tokenizer.decode(p) for p in repeated], texts), dtype=torch.float32)
        return [completions[i] for i in best_in_groups(scores, n).tolist()]
    return sample


@dataclass
class RAFTConfig(OnlineConfig):
    samples_per_prompt: Annotated[int, Range(2)] = 8  # n responses per prompt; the best one is trained on (the paper's K)


class RAFT(OnlineAlgorithm):
    name = "raft"
    Config = RAFTConfig
    key_metrics = ("objective/scores", "objective/best_scores")
    uses_reference = False  # no KL term; the evaluation measures the KL
    rows_per_prompt = 1  # one kept sample per prompt

    def make_rows(self, rollout):
        best = best_in_groups(rollout.scores, self.cfg.samples_per_prompt)  # (G,)
        self.rollout_metrics["objective/best_scores"] = rollout.scores[best].mean()
        rows = rollout.batch()
        return {k: rows[k][best] for k in ("input_ids", "attention_mask", "response_mask")}

    def loss(self, model, batch):
        # the model's own log pi(y | x) summed, lengths (B,)
        _, logps, counts = sequence_logps(model, batch, 1.0, self.cfg.fused_logps)
        loss = sft_loss(logps, counts)
        return loss, {"nll_loss": loss.detach(), **self.rollout_metrics}
