"""Chain of Hindsight (CoH): preference pairs as feedback-conditioned sequences, trained with the SFT loss.

Liu, Sferrazza and Abbeel 2023, "Chain of Hindsight Aligns Language Models with Feedback", arXiv:2302.02676.
Every pair (x, y_w, y_l) becomes one sequence that states the feedback in words, here

    x + " A helpful answer:" + y_w + <eos> + " An unhelpful answer:" + y_l + <eos>

and the model is trained on it with the ordinary language-model loss, restricted (as in the paper, section 3)
to the model-output tokens: the answers and their EOS carry the loss, the prompt and the feedback phrases do not:

    L = -sum_{t in answers} log pi(s_t | s_<t) / (number of answer tokens)       (sft.py's sft_loss)

At sampling time the positive phrase conditions the output: `CoH.format_prompt(cfg, prompt)` returns
prompt + " A helpful answer:" and the model continues with a (hopefully) helpful answer, then EOS. The toy world's
evaluation samples from that text (pipeline.evaluate_run) and scores prompt + answer.

This implementation differs from the paper in:
  - one template with two phrases (Config keys coh_positive / coh_negative), not the paper's pool of natural-
    language templates ("A is better than B", ...). The defaults read as plain English for any data.
  - each answer ends with EOS (and its loss), so sampling after the positive phrase stops after one answer
    instead of going on to write the negative phrase; the paper does not say how generation ends.
  - the two answers come in a random order per pair (seeded; coh_order="positive_first" fixes it), so each
    phrase also conditions an answer that follows the prompt directly.
  - coh_phrase_first=True writes "phrase prompt answer<eos> phrase prompt answer<eos>" (the prompt twice) for data
    whose answers continue the prompt's sentence, as the toy world's do: the paper's phrase between prompt and
    answer cuts that sentence in two. Such sequences are never cut; one over max_len is dropped.
  - no random masking of 0-5% of past tokens and no pretraining-data regulariser (both in the paper).
  - pieces are joined with one space where neither side has whitespace at the boundary; over max_len the prompt
    is cut from the left, and a pair whose phrases and answers alone do not fit is dropped (counted as too_long).

Why it needs a recipe of its own on the toy world: both answers of a pair are samples of the model itself, so the
SFT gradient on them averages to zero and only which answer follows which phrase carries information; at the
settings the other offline algorithms use the model never learns to read the phrase. data/coh_toy.toml (in-
vocabulary phrases first, a far larger learning rate and step count) does learn it. The diagnosis and the
measurements: docs/coh.md.
"""
import random
from dataclasses import dataclass
from typing import Literal

from nanoalign.algos.sft import SFT
from nanoalign.data import Filtered, read_jsonl, report


@dataclass
class CoHConfig:
    coh_positive: str = "A helpful answer:"  # feedback phrase before the chosen answer (and at sampling time)
    coh_negative: str = "An unhelpful answer:"  # feedback phrase before the rejected answer
    coh_order: Literal["random", "positive_first"] = "random"  # order of the two answers in each sequence
    coh_phrase_first: bool = False  # phrase before the prompt (repeated for each answer), not between prompt and answer


def spaced(text, piece):
    """`piece`, with one space in front where neither `text` nor `piece` has whitespace at the boundary."""
    return " " + piece if text and piece and not text[-1].isspace() and not piece[0].isspace() else piece


def hindsight_segments(prompt, chosen, rejected, positive, negative, positive_first=True, phrase_first=False):
    """[(text, is_answer)] of one CoH sequence; the tokenizer adds EOS after each answer. Prompt first, then
    phrase + answer twice; with phrase_first, phrase + prompt + answer twice (each answer continues its prompt)."""
    feedback = [(positive, chosen), (negative, rejected)]
    if not positive_first:
        feedback.reverse()
    segments, text = ([], "") if phrase_first else ([(prompt, False)], prompt)
    for phrase, answer in feedback:
        pieces = [(phrase, False), (answer, True)]
        if phrase_first:  # the prompt again, between the phrase and the answer that continues it
            pieces.insert(1, (prompt, False))
        for piece, is_answer in pieces:
            piece = spaced(text, piece)
            segments.append((piece, is_answer))
            text += piece
    return segments


def tokenize_segments(segments, tok, max_len, filtered, cut_prompt=True):
    """{"input_ids", "loss_mask"} of [bos] + segments, EOS after each answer, loss on answers + EOS only. Over
    max_len the prompt (segments[0]) is cut from the left when cut_prompt; None (counted in `filtered`) if the
    sequence does not fit even so."""
    bos = [tok.bos_id] if tok.bos_id is not None else []
    first, rest = (segments[0][0], segments[1:]) if cut_prompt else ("", segments)
    ids, mask = [], []
    for text, is_answer in rest:
        piece = tok.encode(text) + ([tok.eos_id] if is_answer else [])
        ids, mask = ids + piece, mask + [int(is_answer)] * len(piece)
    prompt_ids, budget = tok.encode(first), max_len - len(bos) - len(ids)
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

    def load_file(self, path, fmt):
        """Preference rows rewritten into feedback-conditioned SFT examples (replaces SFT's reading of `fmt`)."""
        rng, filtered, examples = random.Random(self.cfg.seed), Filtered(), []
        for row in read_jsonl(path, "preference"):
            if row["chosen"] == row["rejected"]:  # no feedback to give
                filtered.dropped["chosen_equals_rejected"] += 1
                continue
            positive_first = self.cfg.coh_order == "positive_first" or rng.random() < 0.5
            segments = hindsight_segments(row["prompt"], row["chosen"], row["rejected"], self.cfg.coh_positive,
                                          self.cfg.coh_negative, positive_first, self.cfg.coh_phrase_first)
            example = tokenize_segments(segments, self.tokenizer, self.max_len, filtered,
                                        not self.cfg.coh_phrase_first)
            if example is not None:
                examples.append(example)
        report(filtered, path, len(examples), self.log)
        return examples

    @classmethod
    def format_prompt(cls, cfg, prompt):
        """The prompt to sample from: prompt + the positive phrase. `cfg`: the run config or its saved dict."""
        get = cfg.get if isinstance(cfg, dict) else lambda key, default: getattr(cfg, key, default)
        positive = get("coh_positive", CoHConfig.coh_positive)
        if get("coh_phrase_first", False):
            return positive + spaced(positive, prompt)
        return prompt + spaced(prompt, positive)
