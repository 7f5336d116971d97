"""Annotators for online preference learning: who decides which of two responses is better.

One small interface, `annotator.prefer(prompts, first, second) -> (N,) P(first is better)` in [0, 1], three kinds:
  ScoreAnnotator  a scalar score per (prompt, response) -- a reward model or the toy world's gold reward
                  (nanoalign/scorers.py) -- and the higher score wins: P = 1, 0 or 0.5 on a tie.
  LLMJudge        any nanoalign-loadable language model (`load_model(spec)`), shown the prompt, both responses and
                  an instruction ("Which review is more positive?"), and scored by the log-probabilities of its
                  answer tokens (" A" vs " B"). The "AI feedback" of OAIF (Guo et al. 2024, "Direct Language Model
                  Alignment from Online AI Feedback", arXiv:2402.04792, Sec. 3 and the prompt of their Table 8).

Position bias. LLM judges prefer a slot regardless of content (Zheng et al. 2023, "Judging LLM-as-a-judge",
arXiv:2306.05685, Sec. 3.3). Each pair is therefore asked in BOTH orders and the two answers averaged in log-odds:
with l(x, y) = log p(label A | J(x, y)) - log p(label B | J(x, y)) the judge's log-odds that the response in slot A
wins, the debiased log-odds that `first` wins is

    d = (l(first, second) - l(second, first)) / 2,      P(first better) = sigmoid(d)

If the judge's log-odds are a content term plus a constant slot bias, l(x, y) = b + q(x) - q(y), then
d = q(first) - q(second) exactly: the bias b cancels, and (l1 + l2) / 2 = b measures it (judge/position_bias).
The position-bias RATE is how often the two orders disagree, sign(l(first, second)) != -sign(l(second, first))
(judge/disagreement); `last_agree` marks the pairs where they agree, which online DPO can keep alone
(judge_agreement, as the OAIF recipe counts a label only when both orders give it).
Calibration (calibrate=True; our addition, not OAIF's). A small judge's slot bias can exceed its content signal on
almost every pair (SmolLM2-135M's orders disagreed on 99.5% of pairs: docs/real-model.md), so raw agreement keeps
nearly nothing. Calibrated agreement compares l(first, second) - b_bar and l(second, first) - b_bar, with b_bar the
mean slot bias b over the batch: under l = b + q(x) - q(y) + noise, a pair then agrees when its content term
outweighs the noise and the pair's own deviation from the average bias (last_calibrated_disagreement).
A chat model judges in its own chat template (`chat_template`): the judging text is the user message, the labels
(then "A" / "B", no leading space) are scored as the start of the assistant's answer, a prompt is reduced to the
content of its last user message, and special-token text inside a response is removed (it cannot be shown as text).
Single-token labels are read from one forward per judging prompt (the next-token distribution at its end).
Departures from OAIF: their annotator (PaLM 2-L) generates an answer "1" or "2" and they take its choice; we read
the answer distribution (normalised over the two labels) instead of sampling it, and average both orders (OAIF
mentions position bias but does not swap). The judging prompt is a template, not their few-shot prompt.
"""
from typing import Callable

import torch

from nanoalign.chat import render_messages, user_content
from nanoalign.data import collate
from nanoalign.logps import batch_logps

DEFAULT_TEMPLATE = ("{instruction}\n\nPrompt: {prompt}\n\nResponse A: {first}\n\nResponse B: {second}\n\n"
                    "Which response is better, A or B?\nAnswer:")


def score_preference(first_scores, second_scores):
    """P(first better) from two scores (N,): 1 if the first is higher, 0 if lower, 0.5 if equal."""
    return (torch.sign(first_scores - second_scores) + 1) / 2


class ScoreAnnotator:
    """The response with the higher score wins. `score(prompts, responses) -> (N,)` (a reward model, the gold
    reward); ties (equal scores, e.g. identical responses) give 0.5."""

    def __init__(self, score: Callable[[list[str], list[str]], torch.Tensor]):
        self.score = score

    @torch.no_grad()
    def prefer(self, prompts, first, second):
        scores = self.score(prompts + prompts, first + second).float().cpu()  # one call for both: (2N,)
        return score_preference(scores[:len(prompts)], scores[len(prompts):])


def debiased_logodds(logodds_first_in_a, logodds_second_in_a):
    """Log-odds that `first` wins from the judge's two answers (see the module docstring):
    d = (l(first, second) - l(second, first)) / 2, and the slot bias b = (l(first, second) + l(second, first)) / 2.
    Inputs (N,) -> (d (N,), b (N,))."""
    d = (logodds_first_in_a - logodds_second_in_a) / 2   # content: +q(first)-q(second) twice, bias cancels
    b = (logodds_first_in_a + logodds_second_in_a) / 2   # the slot-A preference shared by both orders
    return d, b


def orders_agree(logodds_first_in_a, logodds_second_in_a):
    """(N,) bool: both orders pick the same response, strictly (a log-odds of exactly 0 picks nothing)."""
    first_wins = (logodds_first_in_a > 0) & (logodds_second_in_a < 0)
    second_wins = (logodds_first_in_a < 0) & (logodds_second_in_a > 0)
    return first_wins | second_wins


class LLMJudge:
    """A language model as a pairwise judge, asked in both orders (module docstring).

    template: a str.format string with {instruction}, {prompt}, {first}, {second}; the answer strings `labels`
    (default " A", " B", the slots of DEFAULT_TEMPLATE) are scored right after it. A judging prompt longer than the
    judge's context is cut from the LEFT (the responses and the question stay; counted in self.truncated).
    The judge runs in eval mode under no_grad, `batch_size` sequences per forward, in fp32 even in a bf16 run:
    bf16 logits round a judge's log-odds to steps of ~1/16, as large as the content signal of a small judge
    (SmolLM2-135M's is ~0.1; docs/real-model.md).
    frozen=False judges with a model that is still being trained (self-rewarding: the policy judges its own
    samples): it is not frozen, only put in eval mode for each call and back afterwards."""

    def __init__(self, model, tokenizer, instruction, template=DEFAULT_TEMPLATE, labels=(" A", " B"),
                 batch_size=32, chat_template=None, calibrate=False, frozen=True):
        self.model = model.eval().requires_grad_(False) if frozen else model
        self.tokenizer, self.instruction, self.calibrate = tokenizer, instruction, calibrate
        self.template, self.batch_size, self.chat_template = template, batch_size, chat_template
        self.label_ids = [tokenizer.encode(label) for label in labels]
        if not all(self.label_ids) or self.label_ids[0] == self.label_ids[1]:
            raise ValueError(f"judge labels {labels!r} must be two different non-empty strings")
        self.truncated = 0
        self.last_position_bias = None  # mean slot-A log-odds of the last call (0 for an unbiased judge)
        self.last_agree, self.last_disagreement = None, None  # (N,) both orders pick the same; 1 - its mean

    def judge_prompt_ids(self, prompt, first, second):
        if self.chat_template is None:
            text = self.template.format(instruction=self.instruction, prompt=prompt, first=first, second=second)
            ids = ([self.tokenizer.bos_id] if self.tokenizer.bos_id is not None else []) + self.tokenizer.encode(text)
        else:
            first, second = (self._as_text(x) for x in (first, second))
            prompt = self._as_text(user_content(prompt, self.chat_template, self.tokenizer.template_tokens))
            text = self.template.format(instruction=self.instruction, prompt=prompt, first=first, second=second)
            ids = render_messages([{"role": "user", "content": text}], self.tokenizer, self.chat_template,
                                  add_generation_prompt=True)[0]
        budget = self.model.cfg.block_size - max(map(len, self.label_ids))
        if len(ids) > budget:
            self.truncated += 1
            ids = ids[len(ids) - budget:]  # keep the end: the responses and the question
        return ids

    def _as_text(self, text):
        for token in self.tokenizer.template_tokens:
            text = text.replace(token, "")
        return text

    @torch.no_grad()
    def slot_logodds(self, prompts, first, second):
        """l = log p(label A | J) - log p(label B | J) for J = the judging prompt with `first` in slot A. (N,)"""
        prompt_ids = [self.judge_prompt_ids(p, x, y) for p, x, y in zip(prompts, first, second)]
        device = next(self.model.parameters()).device
        single = all(len(label) == 1 for label in self.label_ids)  # one row per pair: both labels at its last position
        examples = [{"input_ids": ids + label, "loss_mask": [0] * len(ids) + [1] * len(label)}
                    for ids in prompt_ids for label in ([[]] if single else self.label_ids)]
        scores, was_training = [], self.model.training
        self.model.eval()  # no dropout (a frozen judge is in eval mode already)
        try:
            for i in range(0, len(examples), self.batch_size):
                scores.append(self._label_scores(examples[i:i + self.batch_size], single, device))
        finally:
            self.model.train(was_training)
        scores = torch.cat(scores).view(-1, 2)  # (N, 2): log p(A | J), log p(B | J), up to one constant per row
        return scores[:, 0] - scores[:, 1]

    def _label_scores(self, examples, single, device):
        """One batch of judging examples -> (b, 2) label logits z_A, z_B at the end of J with single-token labels
        (log p(A | J) - log p(B | J) = z_A - z_B: the softmax normaliser cancels, so the head runs for the two
        label rows only), else (b,) log p(label | J)."""
        batch = collate(examples, self.tokenizer.pad_id)
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        if single:
            last = mask.sum(1) - 1                                         # (b,) each row's last real position
            hidden = self.model(ids, mask, return_hidden=True)[torch.arange(len(ids)), last]  # (b, C)
            rows = self.model.lm_head.weight[[label[0] for label in self.label_ids]]          # (2, C)
            return (hidden.float() @ rows.float().T).cpu()                 # (b, 2)
        return batch_logps(self.model, ids, batch["loss_mask"].to(device), mask)[0].float().cpu()  # (b,)

    def prefer(self, prompts, first, second):
        logodds_ab = self.slot_logodds(prompts, first, second)  # first in slot A
        logodds_ba = self.slot_logodds(prompts, second, first)  # first in slot B
        d, b = debiased_logodds(logodds_ab, logodds_ba)
        self.last_position_bias = float(b.mean())
        agree = orders_agree(logodds_ab, logodds_ba)
        self.last_disagreement = 1 - float(agree.float().mean())  # the position-bias rate, always uncalibrated
        if self.calibrate:  # both orders read against the batch's mean slot bias (module docstring)
            agree = orders_agree(logodds_ab - b.mean(), logodds_ba - b.mean())
        self.last_agree = agree
        self.last_calibrated_disagreement = 1 - float(agree.float().mean())
        return torch.sigmoid(d)
