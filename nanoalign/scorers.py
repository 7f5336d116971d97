"""Reward sources for online algorithms, behind one small interface:

    scorer = get_scorer("gold" | "ckpt:<reward model dir>", device)
    scores = scorer(prompts, responses)          # lists of N strings -> (N,) float32 tensor on the CPU

  "gold"        the toy world's gold reward r*(prompt + response) in [0, 1], registered by nanoalign.toy with
                `register_scorer` (the ground truth of the toy world, so optimising it cannot over-optimise a proxy).
  "ckpt:<dir>"  a reward model trained with --algo=rm (nanoalign/algos/rm.py), scored on
                [bos] + prompt + response + [eos] and read at that EOS, exactly as it was trained; its scores are
                normalised to mean 0 / std 1 on reference samples (stored in the checkpoint).
Responses are decoded text without the EOS: whether a response was cut off is the rollout's `eos` flag, and a
penalty for it is the algorithm's choice (PPO's missing_eos_penalty), not the scorer's.
Pairwise annotators (an LLM judge; a scorer where the higher score wins) live in nanoalign/judge.py.
"""
import torch

from nanoalign.loading import load_reward_model
from nanoalign.precision import cast_for_inference_, inference_autocast

SCORERS = {}  # name -> scorer(prompts, responses), filled by register_scorer


def register_scorer(name, scorer):
    """Make get_scorer(name) return `scorer`, a function (prompts, responses) -> (N,) float32 tensor."""
    SCORERS[name] = scorer


class RewardModelScorer:
    """A trained reward model (model.py RewardModel, trained by algos/rm.py) as a scorer of text, `batch_size` sequences per forward,
    in eval mode under no_grad; with `dtype` (bf16 in a bf16 run) its linear weights are stored in that dtype and it
    answers under autocast (nanoalign/precision.py). A sequence longer than the model's context loses the start of
    its prompt."""

    def __init__(self, reward_model, tokenizer, batch_size=64, dtype=None):
        self.model, self.tokenizer, self.batch_size = cast_for_inference_(reward_model, dtype), tokenizer, batch_size
        self.dtype = dtype

    def encode(self, prompt, response):
        """[bos] + prompt + response + [eos], prompt and response encoded separately (as nanoalign.data does)."""
        tok = self.tokenizer
        bos = [tok.bos_id] if tok.bos_id is not None else []
        ids = bos + tok.encode(prompt) + tok.encode(response) + [tok.eos_id]
        return ids[-self.model.backbone.cfg.block_size:]

    @torch.no_grad()
    def __call__(self, prompts, responses):
        device = next(self.model.parameters()).device
        rows = [self.encode(p, r) for p, r in zip(prompts, responses)]
        out = []
        for i in range(0, len(rows), self.batch_size):
            chunk = rows[i:i + self.batch_size]
            T = max(map(len, chunk))
            ids = torch.full((len(chunk), T), self.tokenizer.pad_id, dtype=torch.long)   # (b, T) right-padded
            mask = torch.zeros((len(chunk), T), dtype=torch.long)
            for j, row in enumerate(chunk):
                ids[j, :len(row)], mask[j, :len(row)] = torch.tensor(row), 1
            with inference_autocast(self.model, self.dtype):
                out.append(self.model(ids.to(device), mask.to(device)).float().cpu())     # (b,) at each EOS
        return torch.cat(out)


def get_scorer(spec, device="cpu", batch_size=64, dtype=None):
    """A scorer from a spec string: a registered name ("gold") or "ckpt:<dir>" (a bare path means a checkpoint);
    `dtype`: the reward model's inference dtype (RewardModelScorer)."""
    if spec in SCORERS:
        return SCORERS[spec]
    if not spec:
        raise ValueError('empty reward spec: give "gold" or "ckpt:<reward model dir>"')
    if spec == "gold":
        raise ValueError('reward "gold" is the toy world\'s: import nanoalign.toy to register it')
    model, tokenizer = load_reward_model(spec, device)
    return RewardModelScorer(model, tokenizer, batch_size, dtype)
