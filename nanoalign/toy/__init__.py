"""The toy world: synthetic movie reviews, a gold sentiment reward and simulated annotators (see world.py).

Importing it registers what it provides with the core: the "toy" tokenizer spec (a BPE trained on its words) and
the "gold" reward scorer. The core never imports the toy world.
"""
import torch

from nanoalign.scorers import register_scorer
from nanoalign.tokenizer import register_encoding, toy_encoding
from nanoalign.toy.world import gold_reward, vocabulary


def gold_scorer(prompts, responses):
    """The toy world's gold reward of each full review (prompt + response), as the DPO paper scores it."""
    return torch.tensor([gold_reward(p + r) for p, r in zip(prompts, responses)], dtype=torch.float32)


register_encoding("toy", lambda: toy_encoding(vocabulary()))
register_scorer("gold", gold_scorer)
