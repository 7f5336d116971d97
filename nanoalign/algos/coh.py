"""Chain of Hindsight (CoH): preference pairs as feedback-conditioned sequences, trained with the SFT loss.

Liu, Sferrazza and Abbeel 2023, "Chain of Hindsight Aligns Language Models with Feedback", arXiv:2302.02676.
Every pair (x, y_w, y_l) becomes one sequence that states the feedback in words, here

    x + " A helpful answer:" + y_w + <eos> + " An unhelpful answer:" + y_l + <eos>

and the model is trained on it with the ordinary language-model loss, restricted (as in the paper, section 3)
to the model-output tokens: the answers and their EOS carry the loss, the prompt and the feedback phrases do not:

    L = -sum_{t in answers} log pi(s_t | s_<t) / (number of answer tokens)       (sft.py's sft_loss)

At sampling time the positive phrase conditions the output: `CoH.format_prompt(cfg, prompt)` returns
prompt + " A helpful answer:" and the model continues with a (hopefully) helpful answer, then EOS.

This implementation differs from the paper in:
  - one template with two phrases (Config keys coh_positive / coh_negative), not the paper's pool of natural-
    language templates ("A is better than B", ...). The defaults read as plain English for any data; the toy
    world's tokenizer spells them in sub-word pieces, which the CoH run learns like any other tokens.
  - each answer ends with EOS (and its loss), so sampling after the positive phrase stops after one answer
    instead of going on to write the negative phrase; the paper does not say how generation ends.
  - the two answers come in a random order per pair (seeded; coh_order="positive_first" fixes it), so each
    phrase also conditions an answer that follows the prompt directly.
  - no random masking of 0-5% of past tokens and no pretraining-data regulariser (both in the paper).
  - pieces are joined with one space where neither side has whitespace at the boundary; over max_len the prompt
    is cut from the left, and a pair whose phrases and answers alone do not fit is dropped (counted as too_long).
"""
import random
from dataclasses import dataclass
from typing import Literal

from nanoalign.algos.sft import SFT
from nanoalign.data import Filtered, read_jsonl, report
from nanoalign.trainer import Algorithm


@dataclass
class CoHConfig:
    coh_positive: str = "A helpful answer:"  # feedback phrase before the chosen answer (and at sampling time)
    coh_negative: str = "An unhelpful answer:"  # feedback phrase before the rejected answer
    coh_order: Literal["random", "positive_first"] = "random"  # order of the two answers in each sequence


def spaced(text, piece):
    """`piece`, with one space in front where neither `text` nor `piece` has whitespace at the boundary."""
    return " " + piece if text and piece and not text[-1].isspace() and not piece[0].isspace() else piece


def hindsight_segments(prompt, chosen, rejected, positive, negative, positive_first=True):
    """[(text, is_answer)] of one CoH sequence, prompt first; the tokenizer adds EOS after each answer."""
    feedback = [(positive, chosen), (negative, rejected)]
    if not positive_first:
        feedback.reverse()
    segments, text = [(prompt, False)], prompt
    for phrase, answer in feedback:
        for piece, is_answer in ((phrase, False), (answer, True)):
            piece = spaced(text, piece)
            segments.append((piece, is_answer))
            text += piece
    return segments


def tokenize_segments(segments, tok, max_len, filtered):
    """{"input_ids", "loss_mask"} of [bos] + segments, EOS after each answer, loss on answers + EOS only;
    None (counted in `filtered`) if it does not fit even with the prompt (segments[0]) cut to nothing."""
    bos = [tok.bos_id] if tok.bos_id is not None else []
    ids, mask = [], []
    for text, is_answer in segments[1:]:
        piece = tok.encode(text) + ([tok.eos_id] if is_answer else [])
        ids, mask = ids + piece, mask + [int(is_answer)] * len(piece)
    prompt_ids, budget = tok.encode(segments[0][0]), max_len - len(bos) - len(ids)
    if budget < 0:
        filtered.dropped["too_long"] += 1
        return None
    if len(prompt_ids) > budget:  # keep the end of the prompt, next to the answers
        prompt_ids, filtered.truncated = prompt_ids[len(prompt_ids) - budget:], filtered.truncated + 1
    return {"input_ids": bos + prompt_ids + ids, "loss_mask": [0] * (len(bos) + len(prompt_ids)) + mask}


class CoH(SFT):
    """SFT's batches, loss and evaluation on the rewritten sequences; only the data differs."""
    name = "coh"
    Config = CoHConfig
    data_format = "preference"

    def __init__(self, cfg, policy, tokenizer, ctx):
        Algorithm.__init__(self, cfg, policy, tokenizer, ctx)
        log = print if ctx.master else (lambda *a, **k: None)
        max_len = min(cfg.max_len, policy.cfg.block_size)  # longer sequences do not fit the model
        self.examples = self.load(cfg.data, max_len, log)
        self.eval_examples = self.load(cfg.eval_data, max_len, log) if cfg.eval_data else []

    def load(self, path, max_len, log):
        rng, filtered, examples = random.Random(self.cfg.seed), Filtered(), []
        for row in read_jsonl(path, "preference"):
            if row["chosen"] == row["rejected"]:  # no feedback to give
                filtered.dropped["chosen_equals_rejected"] += 1
                continue
            positive_first = self.cfg.coh_order == "positive_first" or rng.random() < 0.5
            segments = hindsight_segments(row["prompt"], row["chosen"], row["rejected"], self.cfg.coh_positive,
                                          self.cfg.coh_negative, positive_first)
            example = tokenize_segments(segments, self.tokenizer, max_len, filtered)
            if example is not None:
                examples.append(example)
        report(filtered, path, len(examples), log)
        return examples

    @classmethod
    def format_prompt(cls, cfg, prompt):
        """The prompt to sample from: prompt + the positive phrase. `cfg`: the run config or its saved dict."""
        positive = cfg["coh_positive"] if isinstance(cfg, dict) else cfg.coh_positive
        return prompt + spaced(prompt, positive)
