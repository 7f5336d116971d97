"""The listwise data format (data.py): validation with path:line errors, ranking rows, ties, tokenising, collate, and
the example file; the toy world's listwise annotator (world.score_list)."""
import json
import math
import random
from pathlib import Path

import pytest
import torch

from nanoalign.chat import render_messages
from nanoalign.data import DataError, collate, load_examples, read_jsonl, row_lengths
from nanoalign.tokenizer import get_tokenizer
from nanoalign.toy.world import bradley_terry_prob, score_list

ROOT = Path(__file__).resolve().parents[1]
GOOD = {"prompt": "p", "completions": [" a", " b", " c"], "scores": [1, 0.5, 0]}
CHAT = [{"role": "user", "content": "rate it"}]


def write_jsonl(path, rows):
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


@pytest.mark.parametrize("bad_line,message", [
    ({"prompt": "p", "completions": [" a"], "scores": [1]},
     "field 'completions': expected a list of at least 2 completions, got a list of 1"),
    ({"prompt": "p", "completions": " a", "scores": [1]},
     "field 'completions': expected a list of at least 2 completions, got string"),
    ({"prompt": "p", "completions": [" a", 3], "scores": [1, 0]},
     "field 'completions[1]': expected a non-empty string, got int"),
    ({"prompt": "p", "completions": [" a", ""], "scores": [1, 0]},
     "field 'completions[1]': expected a non-empty string, got an empty string"),
    ({"prompt": "p", "completions": [" a", " b"]}, "missing field 'scores' (one number per completion"),
    ({"prompt": "p", "completions": [" a", " b"], "scores": [1]},
     "field 'scores': expected a list of 2 numbers (one per completion), got a list of 1"),
    ({"prompt": "p", "completions": [" a", " b"], "scores": 1},
     "field 'scores': expected a list of 2 numbers (one per completion), got int"),
    ({"prompt": "p", "completions": [" a", " b"], "scores": [1, "0"]},
     "field 'scores[1]': expected a finite number, got string"),
    ({"prompt": "p", "completions": [" a", " b"], "scores": [True, 0]},
     "field 'scores[0]': expected a finite number, got bool"),
    ('{"prompt": "p", "completions": [" a", " b"], "scores": [NaN, 0]}',
     "field 'scores[0]': expected a finite number, got nan"),
    ({"prompt": "p", "completions": [" a", " b", " a"], "scores": [1, 0, 2]},
     "field 'completions': items 0 and 2 are the same completion"),
    ({"prompt": "p", "ranking": [" a", " a"]}, "field 'ranking': items 0 and 1 are the same completion"),
    ({"prompt": "p", "ranking": [" a"]}, "field 'ranking': expected a list of at least 2 completions, got a list of 1"),
    ({"prompt": "p", "ranking": [" a", " b"], "scores": [1, 0]},
     "field 'ranking': give either 'ranking' (best first) or 'completions'"),
    ({"prompt": "p", "chosen": " a", "rejected": " b"}, "missing field 'completions' (with 'scores') or 'ranking'"),
    ({"completions": [" a", " b"], "scores": [1, 0]}, "missing field 'prompt'"),
    ({"prompt": CHAT, "completions": [" a", " b"], "scores": [1, 0]},
     "field 'completions[0]': messages must be a non-empty list"),
    ({"prompt": CHAT, "ranking": [[{"role": "assistant", "content": "a"}], [{"role": "user", "content": "b"}]]},
     "field 'ranking[1]': a conversational completion holds assistant messages only"),
])
def test_bad_listwise_row_names_file_line_and_field(tmp_path, bad_line, message):
    path = write_jsonl(tmp_path / "lists.jsonl", [GOOD, "", bad_line])
    with pytest.raises(DataError) as e:
        read_jsonl(path, "listwise")
    assert str(e.value).startswith(f"{path}:3: ") and message in str(e.value)


def test_ranking_rows_become_scores_and_extra_columns_are_kept(tmp_path):
    ranked = {"prompt": "q", "ranking": [" best", " mid", " worst"], "id": 7}
    path = write_jsonl(tmp_path / "lists.jsonl", [ranked, GOOD])
    ranked, scored = read_jsonl(path, "listwise")
    assert ranked == {"prompt": "q", "id": 7, "completions": [" best", " mid", " worst"], "scores": [2.0, 1.0, 0.0]}
    assert scored == GOOD


def test_tokenised_lists_share_the_prompt_cut_to_the_longest_and_drop_full_ties(tmp_path):
    """bytes tokenizer (no BOS): max_len 12 leaves 12 - 6 (" worst") - 1 (EOS) = 5 prompt tokens, the END of the
    prompt; a list whose scores all tie is dropped and counted; a list whose longest answer cannot fit, too."""
    tok = get_tokenizer("bytes")
    rows = [{"prompt": "a long prompt", "completions": [" ok", " worst"], "scores": [1, 0]},
            {"prompt": "p", "completions": [" x", " y"], "scores": [0.5, 0.5]},
            {"prompt": "p", "completions": [" x", " much too long"], "scores": [1, 0]}]
    lines = []
    examples = load_examples(write_jsonl(tmp_path / "l.jsonl", rows), "listwise", tok, 12, log=lines.append)
    assert lines == [f"data {tmp_path / 'l.jsonl'}: kept 1 of 3 (dropped: all_scores_tied 1, too_long 1); "
                     "prompt cut from the left in 1"]
    (example,) = examples
    assert example["scores"] == [1.0, 0.0] and row_lengths(example) == [9, 12]
    for ids, mask, answer in zip(example["list_ids"], example["list_mask"], (" ok", " worst")):
        assert ids == tok.encode("rompt" + answer) + [tok.eos_id]
        assert mask == [0] * 5 + [1] * (len(answer) + 1)


def test_conversational_lists_render_each_answer_in_the_chat_format(tmp_path):
    tok = get_tokenizer("bytes")
    answers = [[{"role": "assistant", "content": "great"}], [{"role": "assistant", "content": "awful"}]]
    too_long = [answers[0], [{"role": "assistant", "content": "x" * 90}]]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"prompt": CHAT, "ranking": answers},
                                                 {"prompt": CHAT, "ranking": too_long}])
    lines = []
    (example,) = load_examples(path, "listwise", tok, 60, log=lines.append)
    assert "dropped: too_long 1" in lines[0]  # the list goes whole when one answer is too long
    for ids, mask, answer in zip(example["list_ids"], example["list_mask"], answers):
        assert ids == render_messages(CHAT + answer, tok, "plain")[0]
        assert tok.decode([i for i, m in zip(ids, mask) if m]) == f" {answer[0]['content']}<|endoftext|>"


def test_collate_lists_of_different_sizes_into_rows_and_slots():
    """Two lists (3 and 2 completions): 5 rows, list 0 first; scores / valid (2, 3); per-example numbers -> (B,)."""
    examples = [{"list_ids": [[1, 2], [1, 3, 4], [1]], "list_mask": [[0, 1], [0, 1, 1], [1]], "scores": [0.5, 1.0, 0.0],
                 "ref_logps_0": -1.0},
                {"list_ids": [[5, 6], [5]], "list_mask": [[0, 1], [1]], "scores": [2.0, 3.0], "ref_logps_0": -2.0}]
    batch = collate(examples, pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 0], [1, 3, 4], [1, 0, 0], [5, 6, 0], [5, 0, 0]]
    assert batch["attention_mask"].sum(1).tolist() == [2, 3, 1, 2, 1]
    assert batch["scores"].tolist() == [[0.5, 1.0, 0.0], [2.0, 3.0, 0.0]]
    assert batch["valid"].tolist() == [[True, True, True], [True, True, False]]
    assert batch["ref_logps_0"].tolist() == [-1.0, -2.0]


def test_the_example_file_loads_with_both_row_shapes():
    rows = read_jsonl(ROOT / "data/examples/listwise.jsonl", "listwise")
    assert len(rows) == 16 and all(3 <= len(r["completions"]) == len(r["scores"]) <= 4 for r in rows)
    examples = load_examples(ROOT / "data/examples/listwise.jsonl", "listwise", get_tokenizer("bytes"), 128,
                             log=lambda line: None)
    assert len(examples) == 16


# ------------------------------------------------------------------------------------------- the toy annotator
def test_score_list_dedupes_and_orders_pairs_like_the_bradley_terry_annotators():
    """Each pair of a scored list is ordered with P = sigmoid((r_a - r_b) / tau): over 4000 lists of rewards
    (0.7, 0.5, 0.2), the frequencies are within 4 standard errors of bradley_terry_prob."""
    rng, stats = random.Random(0), {}
    assert score_list("p", [" a", " a"], [0.5, 0.5], rng=rng, stats=stats) is None
    assert stats == {"duplicates": 1, "short_lists": 1}
    row = score_list("p", [" a", " b", " a"], [0.9, 0.1, 0.9], rng=rng, stats=stats)
    assert row["completions"] == [" a", " b"] and len(row["scores"]) == 2 and stats["duplicates"] == 2
    rewards, n = (0.7, 0.5, 0.2), 4000
    wins = torch.zeros(3, 3)
    for _ in range(n):
        s = score_list("p", [" a", " b", " c"], list(rewards), rng=rng)["scores"]
        wins += torch.tensor([[float(s[i] > s[j]) for j in range(3)] for i in range(3)])
    for i, j in ((0, 1), (0, 2), (1, 2)):
        p = bradley_terry_prob(rewards[i], rewards[j])
        assert abs(wins[i, j].item() / n - p) < 4 * math.sqrt(p * (1 - p) / n)
