"""Online algorithms: annotators (LLM judge in both orders), online DPO, RLOO, GRPO, RAFT / best-of-n.

The pure math (rloo_advantages, grpo_advantages, grpo_loss, best_of_n_kl) is tested in tests/test_rl_math.py;
here we test how the adapters use it, the judge's debiasing, best-of-n's KL, and 2-step runs of each algorithm.
"""
import math
import re

import pytest
import torch
import torch.nn as nn

from nanoalign.judge import LLMJudge, ScoreAnnotator, debiased_logodds
from nanoalign.tokenizer import get_tokenizer
from nanoalign.toy.world import sentiment_score

TOKENIZER = get_tokenizer("toy")
PROMPTS = ["the plot was", "i would", "this movie made me"]
GOOD = [" great .", " recommend it .", " laugh ."]
BAD = [" dull .", " not recommend it .", " yawn ."]


class StubJudgeLM(nn.Module):
    """A fake judge language model for the toy tokenizer. At every position its next-token logits put
    `slot_bias + content * (q(A) - q(B))` on the token "A" relative to "B", where q is the toy sentiment score of
    the text after "Response A:" / "Response B:" in the row. content=0 is a judge that only ever prefers slot A."""

    def __init__(self, slot_bias, content):
        super().__init__()
        self.cfg = type("Cfg", (), {"block_size": 512})()
        self.anchor = nn.Parameter(torch.zeros(()))  # gives the module a device
        self.slot_bias, self.content = slot_bias, content
        self.a_id, self.b_id = TOKENIZER.encode("A")[0], TOKENIZER.encode("B")[0]

    def forward(self, idx, attention_mask=None):
        B, T = idx.shape
        logits = torch.zeros(B, T, TOKENIZER.vocab_size)
        for i in range(B):
            text = TOKENIZER.decode(idx[i])
            slot_a, slot_b = re.search(r"Response A:(.*?)\n\nResponse B:(.*?)\n\n", text, re.S).groups()
            logits[i, :, self.a_id] = self.slot_bias + self.content * (sentiment_score(slot_a) - sentiment_score(slot_b))
        return logits


def test_debiased_logodds_by_hand():
    """l(first, second) = 3 + 1 = 4 and l(second, first) = 3 - 1 = 2 (bias 3, content +1 for first):
    d = (4 - 2) / 2 = 1, b = (4 + 2) / 2 = 3."""
    d, b = debiased_logodds(torch.tensor([4.0]), torch.tensor([2.0]))
    assert d.item() == pytest.approx(1.0) and b.item() == pytest.approx(3.0)


def test_judge_with_only_a_position_bias_gives_a_tie():
    judge = LLMJudge(StubJudgeLM(slot_bias=4.0, content=0.0), TOKENIZER, "Which review is more positive?")
    one_order = torch.sigmoid(judge.slot_logodds(PROMPTS, GOOD, BAD))
    assert (one_order > 0.98).all()  # asked once, it always picks slot A
    p = judge.prefer(PROMPTS, GOOD, BAD)
    assert torch.allclose(p, torch.full((3,), 0.5), atol=1e-5)  # both orders: a tie
    assert judge.last_position_bias == pytest.approx(4.0, abs=1e-4)


def test_judge_that_truly_prefers_a_response_keeps_the_preference():
    """slot bias 4 outweighs the content term (|q(good) - q(bad)| <= 3 here), so one order alone would always say
    slot A; both orders recover sigmoid(q(first) - q(second)) whichever slot the better response is put in."""
    judge = LLMJudge(StubJudgeLM(slot_bias=4.0, content=1.0), TOKENIZER, "Which review is more positive?")
    expected = torch.sigmoid(torch.tensor([sentiment_score(g) - sentiment_score(b) for g, b in zip(GOOD, BAD)]))
    good_first, good_second = judge.prefer(PROMPTS, GOOD, BAD), judge.prefer(PROMPTS, BAD, GOOD)
    assert (good_first > 0.5).all() and (good_second < 0.5).all()
    assert torch.allclose(good_first, expected, atol=1e-4)
    assert torch.allclose(good_first + good_second, torch.ones(3), atol=1e-5)  # symmetric in the two responses


def test_judge_labels_must_differ():
    with pytest.raises(ValueError):
        LLMJudge(StubJudgeLM(0.0, 0.0), TOKENIZER, "x", labels=(" A", " A"))


def test_score_annotator_prefers_the_higher_score_and_ties_at_half():
    annotator = ScoreAnnotator(lambda prompts, responses: torch.tensor([sentiment_score(p + r) for p, r in
                                                                         zip(prompts, responses)]))
    p = annotator.prefer(PROMPTS + ["a"], GOOD + [" fine ."], BAD + [" fine ."])
    assert p.tolist() == [1.0, 1.0, 1.0, 0.5]
